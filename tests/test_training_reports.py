"""What a training run leaves beside its checkpoint for people: the curves and rewards plots, and the model card."""

import re

import numpy as np
import pytest
import yaml
from matplotlib.image import imread

from useful_code.model_card import USAGE, model_card, write_model_card
from useful_code.training_plots import plot_curves, plot_rewards

PNG = b"\x89PNG"
HISTORY = [
    {"loss": 0.69, "learning_rate": 1e-5, "epoch": 0.1, "step": 10},
    {"loss": 0.61, "learning_rate": 9e-6, "epoch": 0.2, "step": 20, "accuracy": 0.62},
    {"eval_loss": 0.64, "eval_accuracy": 0.66, "epoch": 0.2, "step": 20},
    {"loss": 0.52, "learning_rate": 5e-6, "epoch": 0.3, "step": 30, "accuracy": 0.71},
    {"eval_loss": 0.58, "eval_accuracy": 0.72, "epoch": 0.3, "step": 30},
    {"train_loss": 0.6, "train_runtime": 12.0, "epoch": 0.3, "step": 30},  # the Trainer's end-of-training summary
]
METRICS = {
    "train_loss": 0.5871, "train_steps": 30, "eval_accuracy": 0.8125, "eval_loss": 0.4321, "eval_ties": 2,
    "examples": {
        "train": {"format": "messages", "read": 1234, "invalid": {"empty_response": 7}, "used": 1211,
                  "overlength": 16, "truncated": 5, "dropped_overlength": 11},
        "eval": {"format": "messages", "read": 300, "invalid": {}, "used": 300, "source": "--eval_set_path",
                 "truncated": 3},
    },
    "reload_max_abs_diff": 3.1e-05, "wall_time_s": 98.4, "world_size": 4, "dtype": "torch.bfloat16",
    "arguments": {"model_name": "google/gemma-2b-it", "train_set_path": "hendrydong/preference_700K",
                  "eval_set_path": "/data/eval.jsonl", "learning_rate": 2e-06, "per_device_train_batch_size": 1,
                  "gradient_accumulation_steps": 64, "num_train_epochs": 1, "max_steps": -1, "max_length": 4096,
                  "seed": 42, "deepspeed": None},
    "lora": {"use_peft": True, "lora_r": 16, "lora_alpha": 32},
    "versions": {"python": "3.11.7", "transformers": "5.24.0"},
}
COMMAND = ["deepspeed", "bradley-terry-rm/train.py", "configs/gemma.yaml", "--run_name", "my run"]


def front_matter(card: str) -> dict:
    match = re.match(r"---\n(.*?)\n---\n", card, re.S)
    assert match, card[:200]
    return yaml.safe_load(match.group(1))


def test_curves_are_a_png_at_the_path(tmp_path):
    path = tmp_path / "curves.png"
    assert plot_curves(HISTORY, path) == str(path)
    assert path.read_bytes().startswith(PNG)
    assert [p.name for p in tmp_path.iterdir()] == ["curves.png"]  # no temp file left beside it


def test_curves_leave_out_empty_panels_and_write_nothing_without_points(tmp_path, capsys):
    both, loss_only = tmp_path / "both.png", tmp_path / "loss.png"
    plot_curves(HISTORY, both)
    plot_curves([{k: v for k, v in e.items() if "accuracy" not in k} for e in HISTORY], loss_only)
    assert imread(loss_only).shape[1] < 0.7 * imread(both).shape[1]  # one panel, not two
    assert plot_curves([], tmp_path / "empty.png") is None
    assert plot_curves(HISTORY[-1:], tmp_path / "summary.png") is None  # a summary has no curve point
    assert not (tmp_path / "empty.png").exists() and not (tmp_path / "summary.png").exists()
    assert capsys.readouterr().out.count("not written: the run logged no loss or accuracy to draw") == 2


def test_rewards_plot_and_bad_rewards(tmp_path):
    rng = np.random.default_rng(0)
    rewards = np.stack([rng.normal(1, 1, 200), rng.normal(0, 1, 200)], axis=1)
    path = tmp_path / "rewards.png"
    assert plot_rewards(rewards[:, 0], rewards[:, 1], path) == str(path)
    assert path.read_bytes().startswith(PNG)
    assert plot_rewards([0.5, 0.5], [0.5, 0.5], tmp_path / "flat.png")  # equal rewards still get bins
    rewards[3, 0], rewards[7, 1] = np.nan, np.inf
    with pytest.raises(ValueError, match="2 of the 400 rewards"):
        plot_rewards(rewards[:, 0], rewards[:, 1], tmp_path / "nan.png")
    with pytest.raises(ValueError, match="pairs"):
        plot_rewards([1.0, 2.0], [1.0], tmp_path / "odd.png")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["flat.png", "rewards.png"]


def test_bt_card_has_the_counts_results_command_and_hub_front_matter():
    card = model_card(METRICS, base_model="google/gemma-2b-it", kind="bt", command=COMMAND)
    assert front_matter(card) == {"library_name": "transformers", "base_model": "google/gemma-2b-it",
                                  "tags": ["reward-model", "rlhf", "bradley-terry"],
                                  "pipeline_tag": "text-classification"}
    for row in ("| read | 1234 | 300 |", "| used | 1211 | 300 |", "| dropped: longer than max_length | 11 |  |",
                "| truncated to max_length | 5 | 3 |", "| dropped: invalid (empty_response) | 7 | 0 |",
                "| held-out accuracy | 0.8125 |", "| held-out loss | 0.4321 |",
                "| reload check: largest difference | 3.1e-05 |"):
        assert row in card
    assert "deepspeed bradley-terry-rm/train.py configs/gemma.yaml --run_name 'my run'" in card
    for line in ("- learning_rate: 2e-06", "- effective batch size: 256 (4 process(es))", "- lora_r: 16",
                 "- Training set: `hendrydong/preference_700K`", "- transformers: 5.24.0"):
        assert line in card
    assert "max_steps" not in card and "deepspeed: None" not in card  # unset values are left out
    assert "AutoModelForSequenceClassification.from_pretrained(path)" in card and ".logits[0, 0]" in card


def test_pm_card_and_a_local_base_model(tmp_path):
    card = model_card(METRICS, base_model=str(tmp_path), kind="pm", command=["python", "pair-pm/train.py"])
    meta = front_matter(card)
    assert meta["pipeline_tag"] == "text-generation" and meta["library_name"] == "transformers"
    assert "base_model" not in meta and f"fine-tuned from `{tmp_path}`" in card  # the Hub takes Hub ids only
    assert "AutoModelForCausalLM" in card and "[RESPONSE A]" in card


def test_a_card_renders_without_any_metrics_section():
    card = model_card({}, base_model="org/model", kind="bt", command=["python", "train.py"])
    assert front_matter(card)["base_model"] == "org/model"
    assert "## Results" not in card and "## How to use" in card and "python train.py" in card
    partial = {"examples": {"train": {"read": 10, "used": 9}}, "arguments": None, "eval_accuracy": 0.5}
    card = model_card(partial, base_model="m", kind="pm", command=[], load_snippet="my_loader()")
    assert "| read | 10 |" in card and "| held-out accuracy | 0.5 |" in card
    assert "```python\nmy_loader()\n```" in card and "AutoModelForCausalLM" not in card
    with pytest.raises(ValueError, match="kind"):
        model_card({}, base_model="m", kind="dpo", command=[])


def test_usage_snippets_compile_and_the_pm_prompt_is_the_training_layout():
    from useful_code.pm_data import build_pm_prompt

    for snippet in USAGE.values():
        compile(snippet, "<card>", "exec")
    namespace = {}
    exec(re.search(r"def pm_prompt.*?\n\n", USAGE["pm"], re.S).group(0), namespace)
    context = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2 + 2?"},
               {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3 + 3?"}]
    assert namespace["pm_prompt"](context, "6", "7") == build_pm_prompt(context, "6", "7")


def test_math_card_snippet_scores_each_step():
    from useful_code.defaults import DEFAULT_MODEL

    card = model_card({"arguments": {"reward_type": "orm"}, "eval_accuracy_plus": 0.75}, base_model="m", kind="math",
                      command=[])
    assert "- reward_type: `orm`" in card and '| held-out accuracy on "+" labels | 0.75 |' in card
    scope = {}
    exec(USAGE["math"].replace("path/to/last_checkpoint", DEFAULT_MODEL), scope)  # the untrained tiny model
    assert len(scope["step_scores"]) == 2 and all(0 < p < 1 for p in scope["step_scores"])


def test_write_model_card_writes_readme_atomically(tmp_path):
    path = write_model_card(tmp_path, METRICS, base_model="google/gemma-2b-it", kind="bt", command=COMMAND)
    assert path == str(tmp_path / "README.md")
    assert (tmp_path / "README.md").read_text() == model_card(METRICS, base_model="google/gemma-2b-it", kind="bt",
                                                               command=COMMAND)
    assert [p.name for p in tmp_path.iterdir()] == ["README.md"]
