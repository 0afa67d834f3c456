"""Models are checked on load (modeling.load_model): the kind of checkpoint, every weight the model needs, the
head's shape, and safetensors unless pickled weights are asked for."""

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from useful_code.cli import UserError
from useful_code.defaults import DEFAULT_MODEL
from useful_code.modeling import load_model, load_preference_model, load_reward_model
from useful_code.reward_scorer import checkpoint_kind
from useful_code.templates import load_tokenizer


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(DEFAULT_MODEL, "m")


@pytest.fixture(scope="module")
def bt_checkpoint(tmp_path_factory, tok):
    path = tmp_path_factory.mktemp("bt")
    model = AutoModelForSequenceClassification.from_pretrained(DEFAULT_MODEL, num_labels=1)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_transformers_load_report_becomes_one_line(tok, capfd):
    """The report's table (MISSING score.weight, UNEXPECTED lm_head.weight) on every training run from a base model,
    said in one line; a clean load says nothing."""
    load_reward_model(DEFAULT_MODEL, "--model_name", tok, torch.float32, new_weights=("score.",))
    out, err = capfd.readouterr()
    assert "LOAD REPORT" not in out + err
    assert f"--model_name {DEFAULT_MODEL}: new head initialised: score.weight; weights that " \
           "LlamaForSequenceClassification does not use: lm_head.weight\n" in out


def test_a_complete_checkpoint_loads_without_a_word(tok, bt_checkpoint, capfd):
    load_reward_model(str(bt_checkpoint), "--reward_name_or_path", tok, torch.float32)
    out, err = capfd.readouterr()
    assert "LOAD REPORT" not in out + err and "--reward_name_or_path" not in out + err


def test_a_reward_model_from_a_base_lm_only_when_training_a_new_head(tok):
    with pytest.raises(UserError, match=r"saved as LlamaForCausalLM, not a \.\.\.ForSequenceClassification model; this "
                                        r"script needs a sequence classifier \(a BT reward model, "):
        load_reward_model(DEFAULT_MODEL, "--reward_name_or_path", tok, torch.float32)
    model = load_reward_model(DEFAULT_MODEL, "--model_name", tok, torch.float32, new_weights=("score.",))
    assert model.score.weight.shape == (1, model.config.hidden_size)


def test_a_bt_checkpoint_is_not_a_preference_model(tok, bt_checkpoint):
    with pytest.raises(UserError, match=r"saved as LlamaForSequenceClassification, not a \.\.\.ForCausalLM model; this "
                                        r"script needs a causal LM \(a pairwise preference model, a math PRM or ORM\)"):
        load_preference_model(str(bt_checkpoint), "--reward_name_or_path", tok, torch.float32)
    assert load_reward_model(str(bt_checkpoint), "--reward_name_or_path", tok, torch.float32).num_labels == 1


def test_a_checkpoint_without_its_score_head_is_refused(tok, bt_checkpoint, tmp_path):
    for f in bt_checkpoint.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    weights = load_file(tmp_path / "model.safetensors")
    del weights["score.weight"]
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(UserError, match="lacks 1 weights the model needs, which would be random: score.weight"):
        load_reward_model(str(tmp_path), "--reward_name_or_path", tok, torch.float32)


def test_a_head_of_another_shape_is_refused(tok, tmp_path):
    AutoModelForSequenceClassification.from_pretrained(DEFAULT_MODEL, num_labels=3).save_pretrained(tmp_path)
    with pytest.raises(UserError, match="weights of another shape"):
        load_reward_model(str(tmp_path), "--reward_name_or_path", tok, torch.float32)


def test_pickled_weights_only_with_the_flag(tok, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(DEFAULT_MODEL)
    model.save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")  # an old-style pickled checkpoint
    assert not list(tmp_path.glob("*.safetensors")) and list(tmp_path.glob("*.bin"))
    with pytest.raises(UserError, match="holds only pickled weights .*pass --load_pickled_weights"):
        load_preference_model(str(tmp_path), "--reward_name_or_path", tok, torch.float32)
    model = load_model(AutoModelForCausalLM, str(tmp_path), "--reward_name_or_path", tok, torch.float32,
                       pickled_weights=True)
    reference = AutoModelForCausalLM.from_pretrained(DEFAULT_MODEL)
    assert torch.equal(model.model.embed_tokens.weight, reference.model.embed_tokens.weight)


def test_a_truncated_weights_file_is_one_line(tok, bt_checkpoint, tmp_path):
    for f in bt_checkpoint.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(UserError, match="cannot be read .*truncated or damaged"):
        load_reward_model(str(tmp_path), "--reward_name_or_path", tok, torch.float32)


def test_an_empty_chat_template_is_refused(bt_checkpoint, tmp_path):
    for f in bt_checkpoint.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    (tmp_path / "chat_template.jinja").write_text("")  # what a save killed mid-write left
    with pytest.raises(UserError, match="has no chat template"):
        load_tokenizer(str(tmp_path), "--reward_name_or_path")


@pytest.mark.parametrize("name", ["./no/such/checkpoint", "/no/such/checkpoint", "~/no/such/checkpoint"])
def test_a_missing_local_path_is_called_missing_not_a_bad_hub_name(tok, name):
    """transformers reports a missing directory as an invalid hub repo id; every loader says it is missing."""
    expected = f"^--reward_name_or_path: no such directory '{name}'$"
    with pytest.raises(UserError, match=expected):
        load_tokenizer(name, "--reward_name_or_path")
    with pytest.raises(UserError, match=expected):
        load_reward_model(name, "--reward_name_or_path", tok, torch.float32)
    with pytest.raises(UserError, match=expected):
        checkpoint_kind(name)


def test_an_existing_directory_without_a_model_says_so_or_names_transformers_reason(tok, tmp_path):
    with pytest.raises(UserError, match=r"the directory '.*' holds no model \(no config.json\)$"):
        load_reward_model(str(tmp_path), "--reward_name_or_path", tok, torch.float32)
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')  # a config, no weights
    with pytest.raises(UserError, match=r"could not load model from the directory '.*' \(.+\)$"):
        load_reward_model(str(tmp_path), "--reward_name_or_path", tok, torch.float32)


def test_flash_attention_without_flash_attn_is_one_line(tok, bt_checkpoint):
    """flash_attention_2 asked for where flash-attn is not installed (this CPU machine): a UserError, not transformers'
    ImportError traceback."""
    try:
        import flash_attn  # noqa: F401
        pytest.skip("flash-attn is installed here")
    except ImportError:
        pass
    with pytest.raises(UserError, match="cannot be loaded with --attn_implementation flash_attention_2 here .*use "
                                        "--attn_implementation auto or sdpa"):
        load_reward_model(str(bt_checkpoint), "--reward_name_or_path", tok, torch.float32,
                          attn_implementation="flash_attention_2")


def test_loading_options_transformers_rejects_name_their_own_flag(tok, bt_checkpoint):
    """Not the model's flag: the checkpoint is fine."""
    with pytest.raises(UserError, match=r"^--attn_implementation foo: Specified attn_implementation=\"foo\" is not "
                                        r"supported.*; use auto, sdpa, eager or flash_attention_2$"):
        load_reward_model(str(bt_checkpoint), "--reward_name_or_path", tok, torch.float32, attn_implementation="foo")
    with pytest.raises(UserError, match=r"^--device_map foo: When passing device_map as a string"):
        load_reward_model(str(bt_checkpoint), "--reward_name_or_path", tok, torch.float32, device_map="foo")


def test_disable_dropout_turns_off_dropout_layers_and_llama_attention_dropout(tok):
    """Both kinds of dropout: a BERT's nn.Dropout layers and the float attention_dropout Llama's attention passes to
    SDPA. In train mode the same input then gives the same rewards twice, as in eval mode."""
    from transformers import AutoConfig, BertConfig

    from useful_code.modeling import disable_dropout

    llama_config = AutoConfig.from_pretrained(DEFAULT_MODEL, num_labels=1, attention_dropout=0.5,
                                              pad_token_id=tok.pad_token_id)
    bert_config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                             intermediate_size=64, num_labels=1, hidden_dropout_prob=0.5,
                             attention_probs_dropout_prob=0.5)
    for config, expected in ((llama_config, llama_config.num_hidden_layers), (bert_config, None)):
        torch.manual_seed(0)
        model = AutoModelForSequenceClassification.from_config(config).train()
        ids = torch.randint(3, 100, (2, 12))

        def rewards():
            return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits

        assert not torch.equal(rewards(), rewards())  # dropout on
        layers = sum(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in model.modules())
        turned_off = disable_dropout(model)
        assert turned_off == (expected if expected is not None else layers) and turned_off > 0
        assert torch.equal(rewards(), rewards())
        assert torch.allclose(rewards(), model.eval()(input_ids=ids).logits, atol=1e-6)
        assert disable_dropout(model) == 0
