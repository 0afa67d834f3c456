"""The Hugging Face Hub model card (README.md) a training run writes into its checkpoint, made from its metrics.json:
front matter for the Hub, then what was trained on what, how, with which result, and how to load it."""

from __future__ import annotations

import os
import re
import shlex
import sys
from pathlib import Path
from typing import Optional

import yaml

from useful_code.output_files import atomic_write_text

# kind -> (title, pipeline_tag, tag, what the model is, loss when metrics record no loss type)
KINDS = {
    "bt": ("Bradley-Terry reward model", "text-classification", "bradley-terry",
           "It is a sequence classifier with one output: the reward of a whole conversation (higher is better).",
           "Bradley-Terry, -log sigmoid(r_chosen - r_rejected)"),
    "pm": ("pairwise preference model", "text-generation", "pairwise-preference",
           'It is a causal LM that reads a context and two responses, A and B, and answers "A" or "B": P(A preferred) '
           "is the softmax of those two tokens' logits at the answer position (ask in both orders and average).",
           'cross-entropy on the answer token ("A" or "B")'),
    "math": ("math reward model", "text-generation", "process-reward-model",
             'It is a causal LM that answers "+" (right so far) or "-" after each step of a solution (a process reward '
             "model, reward_type prm) or once after the whole solution (an outcome reward model, orm): a step's score "
             "is P(+), the softmax of those two tokens' logits at its label position.",
             'cross-entropy on the label tokens ("+" or "-")'),
}
EXAMPLE_ROWS = {"read": "read", "held_out_for_eval": "moved to the held-out set",
                "special_token_in_content": "dropped: special token in content",
                "dropped_overlength": "dropped: longer than max_length", "truncated": "truncated to max_length",
                "training_pairs_left_out": "left out: also a training pair", "used": "used"}
HYPER_PARAMETERS = ("learning_rate", "lr_scheduler_type", "warmup_steps", "weight_decay", "optim",
                    "per_device_train_batch_size", "gradient_accumulation_steps", "num_train_epochs", "max_steps",
                    "max_length", "overlength", "packing", "bf16", "activation_checkpointing", "seed", "deepspeed",
                    "reward_type")
RESULTS = (("eval_accuracy", "held-out accuracy"), ("eval_accuracy_chosen_as_A", "held-out accuracy, chosen as A"),
           ("eval_accuracy_chosen_as_B", "held-out accuracy, chosen as B"),
           ("eval_accuracy_plus", 'held-out accuracy on "+" labels'),
           ("eval_accuracy_minus", 'held-out accuracy on "-" labels'), ("eval_labels", "held-out labels"),
           ("eval_loss", "held-out loss"),
           ("eval_ties", "held-out ties (counted as wrong)"),
           ("eval_margin", "held-out mean margin (chosen - rejected)"), ("eval_reward_mean", "held-out reward mean"),
           ("eval_reward_std", "held-out reward standard deviation"), ("train_loss", "training loss (mean)"),
           ("train_steps", "training steps"), ("reload_max_abs_diff", "reload check: largest difference"),
           ("wall_time_s", "wall time (s)"))
USAGE = {
    "bt": '''import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

path = "path/to/last_checkpoint"  # or its Hub id
tokenizer = AutoTokenizer.from_pretrained(path)
model = AutoModelForSequenceClassification.from_pretrained(path).eval()
conversation = [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4"}]
inputs = tokenizer.apply_chat_template(conversation, return_tensors="pt", return_dict=True)
with torch.no_grad():
    reward = model(**inputs).logits[0, 0].item()''',
    "pm": '''import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

path = "path/to/last_checkpoint"  # or its Hub id
tokenizer = AutoTokenizer.from_pretrained(path)
model = AutoModelForCausalLM.from_pretrained(path).eval()

def pm_prompt(context, a, b):  # the layout the model was trained on
    turns = "".join(f"\\n<turn> {m['role']}\\n {m['content']}" for m in context)
    return f"[CONTEXT] \\n{turns}\\n [RESPONSE A] {a} [RESPONSE B] {b} \\n"

context = [{"role": "user", "content": "What is 2 + 2?"}]
messages = [{"role": "user", "content": pm_prompt(context, "4", "5")}]
inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
ab = [tokenizer.encode(label, add_special_tokens=False)[0] for label in ("A", "B")]
with torch.no_grad():
    prob_a = torch.softmax(model(**inputs).logits[0, -1, ab].float(), -1)[0].item()  # P(response A preferred)''',
    "math": '''from useful_code.math_scoring import StepScorer  # this project's scorer: one forward per solution

scorer = StepScorer.from_pretrained("path/to/last_checkpoint", bf16=False)  # or its Hub id
# the layout it was trained on: the problem with the first step, then each step a user turn, each followed by a label
solution = [{"role": "user", "content": "What is 2 + 3 * 4? Step 1: 3 * 4 = 12."},
            {"role": "assistant", "content": "+"},
            {"role": "user", "content": "Step 2: 2 + 12 = 14."},
            {"role": "assistant", "content": "+"}]
step_scores = scorer.score_conversations([solution], progress=False)[0]  # P(+) after each step''',
}


def _value(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else f"`{v}`" if isinstance(v, (str, list)) else str(v)


def _is_hub_id(name: str) -> bool:
    """A Hub id, not a local directory: the Hub rejects a card whose base_model is not one (transformers' own
    cards leave local paths out too)."""
    return bool(re.fullmatch(r"[\w.-]+(/[\w.-]+)?", name)) and not os.path.isdir(name)


def _examples_table(examples: dict) -> list[str]:
    sets = [(name, examples[key]) for key, name in (("train", "train"), ("eval", "held-out"))
            if isinstance(examples.get(key), dict)]
    if not sets:
        return []
    rows = {label: [stats.get(key) for _, stats in sets] for key, label in EXAMPLE_ROWS.items()}
    for _, stats in sets:  # invalid rows are dropped (with --skip_invalid) or stop the run: one row per reason
        for reason in stats.get("invalid") or {}:
            rows[f"dropped: invalid ({reason})"] = [(s.get("invalid") or {}).get(reason, 0) for _, s in sets]
    lines = ["| | " + " | ".join(n for n, _ in sets) + " |", "|---|" + "---:|" * len(sets)]
    lines += [f"| {label} | " + " | ".join("" if v is None else str(v) for v in values) + " |"
              for label, values in rows.items() if any(v is not None for v in values)]
    return [*lines, ""]


def model_card(metrics: dict, *, base_model: str, kind: str, command: list[str],
               load_snippet: Optional[str] = None) -> str:
    """The README.md text of a checkpoint of kind 'bt' (Bradley-Terry), 'pm' (pairwise preference) or 'math' (a
    process or outcome reward model for math), from its run's
    metrics (metrics.json as written; missing entries are left out) and the command line that made it."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {sorted(KINDS)}, not {kind!r}")
    title, pipeline_tag, tag, what, default_loss = KINDS[kind]
    args, examples = metrics.get("arguments") or {}, metrics.get("examples") or {}
    front = {"library_name": "transformers", **({"base_model": base_model} if _is_hub_id(base_model) else {}),
             "tags": ["reward-model", "rlhf", tag], "pipeline_tag": pipeline_tag}
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "", f"# {title[0].upper()}{title[1:]}", "",
             f"A {title} fine-tuned from `{base_model}`. {what}", "", "## Training data", ""]
    train_path, eval_source = args.get("train_set_path") or args.get("dataset_path"), examples.get("eval") or {}
    sources = (("Training set", train_path and f"`{train_path}`"), ("Held-out set", args.get("eval_set_path")
               and f"`{args['eval_set_path']}`"), ("Held-out pairs", eval_source.get("source")))
    lines += [f"- {label}: {value}" for label, value in sources if value]
    lines += ["", *_examples_table(examples), "## Training procedure", "",
              f"- loss: {args.get('loss_type') or default_loss}"]
    lines += [f"- {k}: {_value(args[k])}" for k in HYPER_PARAMETERS if args.get(k) is not None
              and not (k == "max_steps" and args[k] <= 0)]  # max_steps -1: the epochs decide
    per_device, accumulation, world = (args.get("per_device_train_batch_size"),
                                       args.get("gradient_accumulation_steps"), metrics.get("world_size"))
    if all(isinstance(x, int) for x in (per_device, accumulation, world)):
        lines.append(f"- effective batch size: {per_device * accumulation * world} ({world} process(es))")
    lora = metrics.get("lora") or {k: v for k, v in args.items() if k.startswith("lora_")}
    lines += [f"- {k}: {_value(v)}" for k, v in lora.items() if v is not None]
    if metrics.get("dtype"):
        lines.append(f"- dtype: {metrics['dtype']}")
    results = [f"| {label} | {_value(metrics[key])} |" for key, label in RESULTS if metrics.get(key) is not None]
    if results:
        lines += ["", "## Results", "", "| metric | value |", "|---|---:|", *results]
    if metrics.get("versions"):
        lines += ["", "## Library versions", "", *(f"- {k}: {v}" for k, v in metrics["versions"].items())]
    lines += ["", "## How it was made", "", "```bash", shlex.join(command), "```", "", "## How to use", "",
              "```python", (load_snippet or USAGE[kind]).strip("\n"), "```", ""]
    return "\n".join(lines)


def write_model_card(checkpoint_dir, metrics: dict, *, base_model: str, kind: str, command: list[str],
                     load_snippet: Optional[str] = None) -> str:
    """Write model_card(...) to <checkpoint_dir>/README.md (beside, then moved into place); return its path."""
    path = Path(checkpoint_dir, "README.md")
    atomic_write_text(path, model_card(metrics, base_model=base_model, kind=kind, command=command,
                                       load_snippet=load_snippet))
    return str(path)


def launch_command() -> list[str]:
    """How this process was started, as a user would type it: python and the script's arguments, less the
    --local_rank a launcher adds (the launcher itself is not visible from inside)."""
    return ["python", *[a for a in sys.argv if not a.startswith("--local_rank")]]
