"""Behavioural tests of the ArmoRM helpers (useful_code/armo_data.py, armo_embeddings.py, armo_fit.py) and the
exported model's building blocks
(useful_code/modeling_armo_rm.py).

Expected values are written out by hand (token strings of the chat templates, shard ranges, file names, scores of
small matrices), known analytically (Spearman correlations of exactly proportional or reversed rewards, exact
linear labels), or computed independently of the code under test (sklearn Ridge fits on a split reproduced here,
scipy's spearmanr over the grid, the backbone's own hidden states on each unpadded sequence, a plain re-implementation
of upstream's backwards search for the gating pattern).
"""

import copy
import json
import re

import numpy as np
import pytest
import torch
from datasets import Dataset
from safetensors.torch import save_file
from scipy.stats import spearmanr
from sklearn.linear_model import Ridge
from sklearn.metrics import mean_squared_error
from sklearn.model_selection import train_test_split

from helpers import sharpened
from useful_code.armo_data import (
    ATTRIBUTES,
    VERBOSITY_INDEX,
    dataset_name,
    embeddings_prefix,
    gating_head_dir,
    load_regression_weights,
    load_shards,
    regression_weights_path,
    save_shard,
    shard_path,
    shard_rows,
    validate_attribute_labels,
)
from useful_code.armo_embeddings import embed, gating_pattern
from useful_code.armo_fit import (
    CORRELATION_THRESHOLD,
    PENALTY_GRID,
    RIDGE_ALPHAS,
    fit_ridge_probes,
    split_rows,
    transform_matrix,
    verbosity_penalties,
)
from useful_code.cli import UserError
from useful_code.defaults import ASSETS, DEFAULT_MODEL
from useful_code.formats import validate_conversations
from useful_code.modeling import load_backbone
from useful_code.modeling_armo_rm import GatingNetwork, armo_score, find_gating_positions
from useful_code.templates import chat_template_error, encode_conversations, load_tokenizer, reject_untemplatable

GEMMA_TEMPLATE = ("{{ bos_token }}{% for message in messages %}{{ '<start_of_turn>' + ('model' if message['role'] == "
                  "'assistant' else message['role']) + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
                  "{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}")

LLAMA3_GATE_TEXT = "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
GEMMA2_GATE_TEXT = "<end_of_turn>\n<start_of_turn>model\n"


def msg(role, content):
    return {"role": role, "content": content}


# user, assistant, user, assistant: the gating pattern occurs twice (after each user turn); the last one counts.
FOUR_TURNS = [msg("user", "Hi there"), msg("assistant", "Hello! How can I help?"), msg("user", "Tell me a joke"),
              msg("assistant", "Final answer")]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(DEFAULT_MODEL, "m")


@pytest.fixture(scope="module")
def gemma_tok(tok):
    """The tiny tokenizer with Gemma-2's turn markers as special tokens and Gemma-2's chat template."""
    gemma = copy.deepcopy(tok)
    gemma.add_tokens(["<start_of_turn>", "<end_of_turn>"], special_tokens=True)
    gemma.chat_template = GEMMA_TEMPLATE
    return gemma


@pytest.fixture(scope="module")
def backbone():
    model, tokenizer = load_backbone(DEFAULT_MODEL, "cpu")
    return model, tokenizer


@pytest.fixture(scope="module")
def sharp_backbone(backbone):
    """The tiny backbone with larger random weights (std 0.3, seeded), so hidden states at different positions and
    of different sequences differ by far more than the tolerances (a row mix-up cannot hide)."""
    model, tokenizer = backbone
    return sharpened(model), tokenizer


def upstream_gating_position(ids, pattern):
    """Upstream's find_token_for_gating, re-implemented plainly: scan backwards for the last exact occurrence of
    the pattern and return its first index."""
    n = len(pattern)
    for i in range(len(ids) - n, -1, -1):
        if list(ids[i:i + n]) == list(pattern):
            return i
    raise ValueError("pattern not found")


def occurrences(ids, pattern):
    n = len(pattern)
    return [i for i in range(len(ids) - n + 1) if list(ids[i:i + n]) == list(pattern)]


# ---------------------------------------------------------------------------------- 1. ridge probes

N_ROWS, DIM = 200, 5


@pytest.fixture(scope="module")
def probe_data():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(N_ROWS, DIM))
    w0 = np.array([1.0, -2.0, 0.5, 3.0, -1.5])
    w1 = np.array([-0.25, 0.75, 2.0, 0.0, 1.0])
    # Pure noise, independent of X; on the validation rows its component in X's column space is removed, so the
    # validation MSE of any linear fit is |y_val|^2 + |X_val w|^2 (no cross term) and shrinking to zero is best.
    noise = rng.normal(size=N_ROWS)
    _, val_rows = train_test_split(np.arange(N_ROWS), test_size=0.2, random_state=42)
    noise[val_rows] -= X[val_rows] @ np.linalg.lstsq(X[val_rows], noise[val_rows], rcond=None)[0]
    half_nan = X @ np.array([0.3, 0.1, -0.7, 0.2, 0.9]) + 0.5 * rng.normal(size=N_ROWS)
    nan_rows = rng.permutation(N_ROWS)[:N_ROWS // 2]
    half_nan[nan_rows] = np.nan
    all_nan = np.full(N_ROWS, np.nan)
    labels = np.stack([X @ w0, X @ w1, noise, half_nan, all_nan], axis=1)
    result = fit_ridge_probes(X, labels)
    train_rows, val_rows = train_test_split(np.arange(N_ROWS), test_size=0.2, random_state=42)
    return dict(X=X, labels=labels, w=[w0, w1], result=result, train=train_rows, val=val_rows)


def direct_scan(X, y, train_rows, val_rows):
    """Validation MSE of each grid alpha, fit and scored on the non-NaN rows of the reproduced split."""
    tr = train_rows[~np.isnan(y[train_rows])]
    va = val_rows[~np.isnan(y[val_rows])]
    mses = []
    for alpha in RIDGE_ALPHAS:
        model = Ridge(alpha=alpha, fit_intercept=False).fit(X[tr], y[tr])
        mses.append(mean_squared_error(y[va], model.predict(X[va])))
    return tr, va, np.array(mses)


def test_ridge_grid_is_upstreams():
    assert RIDGE_ALPHAS == (0.0001, 0.001, 0.01, 0.1, 1, 10, 100, 1000, 10000)


def test_ridge_result_shapes(probe_data):
    result = probe_data["result"]
    assert result["weight"].shape == (5, DIM)
    assert result["weight"].dtype == np.float32
    for key in ("alpha", "val_mse", "n_train", "n_val"):
        assert len(result[key]) == 5


def test_ridge_exact_linear_labels_pick_smallest_alpha(probe_data):
    result = probe_data["result"]
    for k in (0, 1):
        assert result["alpha"][k] == 1e-4
        np.testing.assert_allclose(result["weight"][k], probe_data["w"][k], atol=1e-3, rtol=0)
        assert result["val_mse"][k] < 1e-6
        assert (result["n_train"][k], result["n_val"][k]) == (160, 40)


def test_ridge_pure_noise_picks_largest_alpha(probe_data):
    X, labels, result = probe_data["X"], probe_data["labels"], probe_data["result"]
    _, _, mses = direct_scan(X, labels[:, 2], probe_data["train"], probe_data["val"])
    # Precondition on this data: shrinking all the way minimises validation MSE.
    assert int(np.argmin(mses)) == len(RIDGE_ALPHAS) - 1
    assert result["alpha"][2] == 1e4
    assert result["val_mse"][2] == pytest.approx(mses[-1], rel=1e-9)
    expected = Ridge(alpha=1e4, fit_intercept=False).fit(X[probe_data["train"]], labels[probe_data["train"], 2]).coef_
    np.testing.assert_allclose(result["weight"][2], expected, atol=1e-6, rtol=1e-5)
    assert np.abs(result["weight"][2]).max() < 0.05  # heavily shrunk


def test_ridge_half_nan_attribute_uses_exactly_its_labelled_rows(probe_data):
    X, labels, result = probe_data["X"], probe_data["labels"], probe_data["result"]
    y = labels[:, 3]
    tr, va, mses = direct_scan(X, y, probe_data["train"], probe_data["val"])
    assert result["n_train"][3] == len(tr)
    assert result["n_val"][3] == len(va)
    assert result["n_train"][3] + result["n_val"][3] == N_ROWS // 2 == int((~np.isnan(y)).sum())
    best = RIDGE_ALPHAS[int(np.argmin(mses))]
    assert result["alpha"][3] == best
    assert result["val_mse"][3] == pytest.approx(mses.min(), rel=1e-9)
    expected = Ridge(alpha=best, fit_intercept=False).fit(X[tr], y[tr]).coef_  # train split only, as upstream
    np.testing.assert_allclose(result["weight"][3], expected, atol=1e-6, rtol=1e-5)
    # A fit on train + validation rows would differ: the weights really come from the train rows alone.
    merged = Ridge(alpha=best, fit_intercept=False).fit(X[np.concatenate([tr, va])], y[np.concatenate([tr, va])]).coef_
    assert np.abs(merged - expected).max() > 1e-3


def test_ridge_all_nan_attribute_gets_zero_weights_and_no_alpha(probe_data):
    result = probe_data["result"]
    assert result["alpha"][4] is None
    assert result["val_mse"][4] is None
    assert (result["n_train"][4], result["n_val"][4]) == (0, 0)
    assert np.all(result["weight"][4] == 0)


def test_ridge_has_no_intercept():
    rng = np.random.default_rng(1)
    X = rng.normal(loc=1.0, size=(N_ROWS, 3))  # non-zero column means, so an offset leaks into the weights
    w = np.array([1.0, 2.0, -1.0])
    y = X @ w + 5.0
    result = fit_ridge_probes(X, y[:, None])
    train_rows, val_rows = train_test_split(np.arange(N_ROWS), test_size=0.2, random_state=42)
    _, _, mses = direct_scan(X, y, train_rows, val_rows)
    best = RIDGE_ALPHAS[int(np.argmin(mses))]
    assert result["alpha"][0] == best
    no_intercept = Ridge(alpha=best, fit_intercept=False).fit(X[train_rows], y[train_rows]).coef_
    np.testing.assert_allclose(result["weight"][0], no_intercept, atol=1e-5, rtol=1e-5)
    # With an intercept the weights would be w itself; without one the offset is absorbed and the fit is imperfect.
    with_intercept = Ridge(alpha=best, fit_intercept=True).fit(X[train_rows], y[train_rows]).coef_
    np.testing.assert_allclose(with_intercept, w, atol=1e-2)
    assert np.abs(result["weight"][0] - w).max() > 0.5
    assert result["val_mse"][0] > 0.1


# ---------------------------------------------------------------------------- 2. verbosity penalties

N_REF, V = 400, 4  # verbosity column index used here = upstream's verbosity dim


def expected_penalty(r, v, grid=PENALTY_GRID, threshold=0.03):
    for p in sorted(grid):
        if spearmanr(r - p * v, v).statistic <= threshold:
            return p
    return 1.0


@pytest.fixture(scope="module")
def reference_rewards():
    rng = np.random.default_rng(3)
    v = rng.permutation(N_REF).astype(float)  # distinct values: exact ranks
    independent = rng.permutation(N_REF).astype(float)
    cols = [
        v.copy(),                                   # 0: r = v -> rho((1-p) v, v) = 1 for every p < 1: never reached
        -v,                                         # 1: r = -v -> rho = -1 already at p = 0
        independent,                                # 2: independent permutation (rho checked <= 0.03) -> 0
        0.32 * v,                                   # 3: (0.32 - p) v: rho = 1 up to p = 0.3, -1 from p = 0.35
        None,                                       # 4: verbosity itself
        0.2 * v + rng.normal(scale=30.0, size=N_REF),   # 5, 6: noisy mixtures, answer by scanning the grid
        0.6 * v + rng.normal(scale=80.0, size=N_REF),
    ]
    cols[V] = v
    rewards = np.stack(cols, axis=1)
    return rewards, verbosity_penalties(rewards, verbosity_index=V)


def test_verbosity_constants_are_upstreams():
    assert VERBOSITY_INDEX == 4 and ATTRIBUTES[4] == "helpsteer-verbosity"
    assert len(ATTRIBUTES) == 19
    assert CORRELATION_THRESHOLD == 0.03
    assert PENALTY_GRID == (0, 0.01, 0.025, 0.05, 0.075, 0.1, 0.125, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45,
                                       0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95)


def test_verbosity_analytic_cases(reference_rewards):
    rewards, out = reference_rewards
    v = rewards[:, V]
    assert out["penalty"][0] == 1.0 and out["corr"][0] == pytest.approx(1.0, abs=1e-12)
    assert out["penalty"][1] == 0 and out["corr"][1] == pytest.approx(-1.0, abs=1e-12)
    rho_independent = spearmanr(rewards[:, 2], v).statistic
    assert rho_independent <= 0.03  # precondition on this permutation
    assert out["penalty"][2] == 0 and out["corr"][2] == pytest.approx(rho_independent, abs=1e-12)
    assert out["penalty"][3] == 0.35 and out["corr"][3] == pytest.approx(-1.0, abs=1e-12)
    assert out["penalty"][V] == 1.0
    assert out["not_reached"] == [0]


def test_verbosity_noisy_cases_match_a_grid_scan(reference_rewards):
    rewards, out = reference_rewards
    v = rewards[:, V]
    for k in (5, 6):
        expected = expected_penalty(rewards[:, k], v)
        assert out["penalty"][k] == expected
        assert out["corr"][k] == pytest.approx(spearmanr(rewards[:, k] - expected * v, v).statistic, abs=1e-12)
        assert out["corr"][k] <= 0.03
    # The two mixtures need different, non-trivial penalties (so the test tells the grid points apart).
    assert 0 < out["penalty"][5] < out["penalty"][6] < 0.95


def test_transform_matrix_applies_penalties(reference_rewards):
    _, out = reference_rewards
    penalty = out["penalty"]
    T = transform_matrix(penalty, verbosity_index=V)
    rng = np.random.default_rng(5)
    r = rng.normal(size=(6, len(penalty)))
    adjusted = r @ T
    for k in range(len(penalty)):
        np.testing.assert_allclose(adjusted[:, k], r[:, k] - penalty[k] * r[:, V], atol=1e-12)
    np.testing.assert_allclose(adjusted[:, V], 0.0, atol=1e-12)  # r_v * (1 - 1)


def test_transform_matrix_by_hand():
    T = transform_matrix(np.array([0.5, 0.1, 1.0]), verbosity_index=2)
    np.testing.assert_array_equal(T, [[1, 0, 0], [0, 1, 0], [-0.5, -0.1, 0]])
    np.testing.assert_allclose(np.array([1.0, 2.0, 3.0]) @ T, [-0.5, 1.7, 0.0], atol=1e-12)


# ------------------------------------------------------------------------------------ 3. gating pattern


def test_gating_pattern_llama3(tok):
    expected = (tok.convert_tokens_to_ids(["<|eot_id|>", "<|start_header_id|>"])
                + tok.encode("assistant", add_special_tokens=False)
                + tok.convert_tokens_to_ids(["<|end_header_id|>"])
                + tok.encode("\n\n", add_special_tokens=False))
    pattern = gating_pattern(tok)
    assert pattern == expected
    assert tok.decode(pattern) == LLAMA3_GATE_TEXT
    assert pattern[0] == tok.eos_token_id == tok.convert_tokens_to_ids("<|eot_id|>")


def test_gating_pattern_gemma2(gemma_tok):
    pattern = gating_pattern(gemma_tok)
    assert gemma_tok.decode(pattern) == GEMMA2_GATE_TEXT
    assert pattern[0] == gemma_tok.convert_tokens_to_ids("<end_of_turn>")
    expected = (gemma_tok.convert_tokens_to_ids(["<end_of_turn>"]) + gemma_tok.encode("\n", add_special_tokens=False)
                + gemma_tok.convert_tokens_to_ids(["<start_of_turn>"])
                + gemma_tok.encode("model\n", add_special_tokens=False))
    assert pattern == expected


@pytest.mark.parametrize("style,end_token,gate_text", [
    ("llama3", "<|eot_id|>", LLAMA3_GATE_TEXT), ("gemma2", "<end_of_turn>", GEMMA2_GATE_TEXT)])
def test_gating_position_is_end_of_last_user_turn(tok, gemma_tok, style, end_token, gate_text):
    t = tok if style == "llama3" else gemma_tok
    pattern = gating_pattern(t)
    ids = encode_conversations(t, [FOUR_TURNS])[0]
    assert len(occurrences(ids, pattern)) == 2  # after each user turn: the search must take the last
    pos = int(find_gating_positions(torch.tensor([ids]), pattern)[0])
    assert pos == upstream_gating_position(ids, pattern)
    assert pos == occurrences(ids, pattern)[-1]
    assert t.convert_ids_to_tokens(ids[pos]) == end_token
    assert t.decode(ids[:pos]).endswith("Tell me a joke")  # closes the LAST user turn
    assert t.decode(ids[pos:]) == gate_text + "Final answer" + end_token + ("\n" if style == "gemma2" else "")


@pytest.mark.parametrize("style", ["llama3", "gemma2"])
def test_gating_positions_batched_with_right_padding(tok, gemma_tok, style):
    t = tok if style == "llama3" else gemma_tok
    pattern = gating_pattern(t)
    convs = [FOUR_TURNS, FOUR_TURNS[2:], [msg("user", "A much longer question " * 5), msg("assistant", "ok")]]
    seqs = encode_conversations(t, convs)
    assert len({len(s) for s in seqs}) == 3
    batch = t.pad({"input_ids": seqs}, padding=True, return_tensors="pt")
    assert batch["attention_mask"][:, -1].tolist().count(0) == 2  # right padded
    positions = find_gating_positions(batch["input_ids"], pattern).tolist()
    assert positions == [upstream_gating_position(s, pattern) for s in seqs]
    assert len(set(positions)) == 3


def test_gating_position_missing_pattern_names_the_row(tok):
    pattern = gating_pattern(tok)
    good = encode_conversations(tok, [FOUR_TURNS])[0]
    bad = encode_conversations(tok, [[msg("user", "Only a question, no answer header")]])[0]
    batch = tok.pad({"input_ids": [good, bad]}, padding=True, return_tensors="pt")
    with pytest.raises(ValueError, match="row 1"):
        find_gating_positions(batch["input_ids"], pattern)
    with pytest.raises(ValueError):
        find_gating_positions(torch.tensor([pattern[:3]]), pattern)  # shorter than the pattern


# DeepSeek-R1's template, reduced: the reasoning is stripped from a rendered assistant turn, but the generation prompt
# opens one ('<think>\n'), so no conversation holds what follows the context with the generation prompt.
R1_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] }}"
               "{% elif m['role'] == 'user' %}{{ '<｜User｜>' + m['content'] }}{% else %}{% set c = m['content'] %}"
               "{% if '</think>' in c %}{% set c = c.split('</think>')[-1] %}{% endif %}"
               "{{ '<｜Assistant｜>' + c + '<｜end▁of▁sentence｜>' }}{% endif %}{% endfor %}"
               "{% if add_generation_prompt %}{{ '<｜Assistant｜><think>\n' }}{% endif %}")
# Phi-3's template, reduced: EOS is written after the last turn unless the generation prompt is, so the generation
# prompt does not extend the rendered context.
PHI3_TEMPLATE = ("{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] + '<|end|>\n' }}{% endfor %}"
                 "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}")
# Mistral's template, reduced: no generation prompt at all, and the space after '[/INST]' joins a response's first word.
MISTRAL_TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'user' %}{{ '[INST] ' + m['content'] + ' [/INST]' }}"
                    "{% else %}{{ ' ' + m['content'] + eos_token }}{% endif %}{% endfor %}")


def with_template(tok, template, markers=(), special=True):
    t = copy.deepcopy(tok)
    if markers:
        t.add_tokens(list(markers), special_tokens=special)
    t.chat_template = template
    return t


@pytest.fixture(scope="module")
def r1_tok(tok):
    return with_template(tok, R1_TEMPLATE, ["<｜User｜>", "<｜Assistant｜>", "<｜end▁of▁sentence｜>", "<think>",
                                            "</think>"], special=False)


@pytest.fixture(scope="module")
def phi3_tok(tok):
    return with_template(tok, PHI3_TEMPLATE, ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"])


def test_gating_pattern_of_a_template_that_strips_reasoning(r1_tok):
    """Read off a rendered conversation, not the generation prompt: neither the user's last letters nor '<think>\n'."""
    prompt = encode_conversations(r1_tok, [[msg("user", "Hello")]], add_generation_prompt=True)[0]
    assert r1_tok.convert_ids_to_tokens(prompt[-3:]) == ["<｜Assistant｜>", "<think>", "\u010a"]  # the case reproduced
    assert gating_pattern(r1_tok) == r1_tok.convert_tokens_to_ids(["<｜Assistant｜>"])


def test_gating_pattern_of_a_template_that_ends_with_eos_without_generation_prompt(phi3_tok):
    context = encode_conversations(phi3_tok, [[msg("user", "Hello")]])[0]
    assert context[-1] == phi3_tok.eos_token_id  # the case reproduced: the generation prompt does not extend it
    expected = (phi3_tok.convert_tokens_to_ids(["<|end|>"]) + phi3_tok.encode("\n", add_special_tokens=False)
                + phi3_tok.convert_tokens_to_ids(["<|assistant|>"]) + phi3_tok.encode("\n", add_special_tokens=False))
    assert gating_pattern(phi3_tok) == expected
    assert phi3_tok.decode(expected) == "<|end|>\n<|assistant|>\n"


@pytest.mark.parametrize("style,last_reply,gate_text", [
    ("r1", "<think>Let me see.</think>Final answer", "<｜Assistant｜>"),
    ("phi3", "Final answer", "<|end|>\n<|assistant|>\n"),
    ("mistral", "the final answer", " [/INST]")])
def test_derived_gating_pattern_is_found_where_the_last_user_turn_ends(tok, r1_tok, phi3_tok, style, last_reply,
                                                                       gate_text):
    t = {"r1": r1_tok, "phi3": phi3_tok, "mistral": with_template(tok, MISTRAL_TEMPLATE)}[style]
    pattern = gating_pattern(t)
    assert t.decode(pattern) == gate_text  # Mistral's: without the space a response's first word takes
    for conversation in (FOUR_TURNS[:3] + [msg("assistant", last_reply)],
                         [msg("system", "Be brief.")] + FOUR_TURNS[2:3] + [msg("assistant", last_reply)]):
        ids = encode_conversations(t, [conversation])[0]
        pos = int(find_gating_positions(torch.tensor([ids]), pattern)[0])
        assert pos == upstream_gating_position(ids, pattern)
        assert t.decode(ids[:pos]).endswith("Tell me a joke")  # the first token after the last user turn


@pytest.mark.parametrize("template", ["{% for m in messages %}{{ m['content'] }}{% endfor %}",
                                      "{% for m in messages %}{{ m['content'] + '\n' }}{% endfor %}"])
def test_gating_pattern_of_a_template_without_assistant_marker_is_one_error(tok, template):
    with pytest.raises(UserError, match="ArmoRM's gating position") as err:
        gating_pattern(with_template(tok, template))
    assert "\n" not in str(err.value)


def test_embed_refuses_a_sequence_without_the_gating_pattern(backbone):
    """Before any forward, naming the sequence, instead of find_gating_positions' ValueError naming a batch row."""
    model, tokenizer = backbone
    pattern = gating_pattern(tokenizer)
    good = encode_conversations(tokenizer, [FOUR_TURNS])[0]
    with pytest.raises(UserError, match=r"^sequence 1 to embed does not hold the gating pattern") as err:
        embed(model, tokenizer, [good, good[:5]], 2, gating_pattern_ids=pattern, progress=False)
    assert "\n" not in str(err.value)
    with pytest.raises(UserError, match=r"^row 7 \(chosen\) does not hold"):
        embed(model, tokenizer, [good[:5]], 2, gating_pattern_ids=pattern, progress=False,
              name=lambda i: f"row {i + 7} (chosen)")


def test_find_gating_positions_by_hand():
    ids = torch.tensor([[9, 1, 2, 3, 8, 1, 2, 3, 7], [1, 2, 3, 0, 0, 0, 0, 0, 0]])
    assert find_gating_positions(ids, [1, 2, 3]).tolist() == [5, 0]


# ------------------------------------------------------------------------------------------- 4. shards


def test_shard_rows_cover_each_row_once():
    shards = [shard_rows(10, 3, k) for k in (1, 2, 3)]
    assert [list(s) for s in shards] == [[0, 1, 2], [3, 4, 5], [6, 7, 8, 9]]
    assert sorted(i for s in shards for i in s) == list(range(10))
    assert list(shard_rows(10, 1, 1)) == list(range(10))


@pytest.mark.parametrize("idx", [0, 4])
def test_shard_rows_rejects_bad_index(idx):
    with pytest.raises(UserError, match="shard_idx"):
        shard_rows(10, 3, idx)


def test_shard_path_naming():
    assert str(shard_path("out/emb/data", 2, 3)) == "out/emb/data-00002-of-00003.safetensors"


def write_run(prefix, n_rows, n_shards, order, meta=None, reverse_within=False):
    emb = torch.arange(n_rows * 2, dtype=torch.float32).reshape(n_rows, 2)
    labels = torch.arange(n_rows, dtype=torch.float32) * 10
    for k in order:
        rows = torch.tensor(list(shard_rows(n_rows, n_shards, k)))
        if reverse_within:
            rows = rows.flip(0)
        save_shard(prefix, k, n_shards, {"embeddings": emb[rows], "labels": labels[rows], "row_ids": rows},
                              meta or {"model": "tiny", "shard": k})
    return emb, labels


def test_shards_round_trip_in_row_order(tmp_path):
    prefix = str(tmp_path / "emb" / "data")
    emb, labels = write_run(prefix, 10, 3, order=(2, 3, 1), reverse_within=True)
    assert (tmp_path / "emb" / "data-00002-of-00003.safetensors").is_file()
    merged, meta = load_shards(prefix)
    assert torch.equal(merged["row_ids"], torch.arange(10))
    assert torch.equal(merged["embeddings"], emb)
    assert torch.equal(merged["labels"], labels)
    assert meta == {"model": "tiny", "shard": 1, "n_shards": 3}


def test_shards_metadata_joins_every_shards_rows_and_counts_and_refuses_another_backbone(tmp_path):
    """RewardBench ids and subsets (one per row) were the first shard's alone, so a benchmark embedded in several
    shards failed after stage 2's training; a shard of another backbone was merged silently."""
    prefix = str(tmp_path / "bench")
    for k in (2, 1, 3):
        rows = list(shard_rows(7, 3, k))[::-1]  # each shard in its own order too
        save_shard(prefix, k, 3, {"row_ids": torch.tensor(rows)},
                   {"model_path": "tiny", "ids": [f"id{r}" for r in rows], "subsets": [f"s{r % 2}" for r in rows],
                    "not_embedded": k, "truncated": 1})
    _, meta = load_shards(prefix)
    assert meta["ids"] == [f"id{r}" for r in range(7)] and meta["subsets"] == [f"s{r % 2}" for r in range(7)]
    assert (meta["not_embedded"], meta["truncated"], meta["model_path"]) == (6, 3, "tiny")
    save_shard(prefix, 2, 3, {"row_ids": torch.tensor(list(shard_rows(7, 3, 2)))},
               {"model_path": "other", "ids": ["a", "b"], "subsets": ["x", "y"]})
    with pytest.raises(UserError, match=r"the shards were prepared with different model_path \(.*other.*tiny"):
        load_shards(prefix)


def test_more_shards_than_rows_is_one_line():
    with pytest.raises(UserError, match="--n_shards 1000 is more than the 600 valid rows: use at most 600 shards"):
        shard_rows(600, 1000, 1)


def test_shards_without_row_ids_concatenate_by_index(tmp_path):
    prefix = str(tmp_path / "data")
    for k in (3, 1, 2):
        save_shard(prefix, k, 3, {"x": torch.tensor([float(k)] * k)}, {})
    merged, meta = load_shards(prefix)
    assert merged["x"].tolist() == [1, 2, 2, 3, 3, 3]
    assert meta["n_shards"] == 3


def test_shards_missing_one_is_an_error(tmp_path):
    prefix = str(tmp_path / "data")
    write_run(prefix, 10, 3, order=(1, 3))
    with pytest.raises(UserError, match=r"\[2\]"):
        load_shards(prefix)


def test_shards_of_two_runs_are_an_error(tmp_path):
    prefix = str(tmp_path / "data")
    write_run(prefix, 10, 3, order=(1, 2, 3))
    write_run(prefix, 10, 2, order=(1, 2))
    with pytest.raises(UserError, match="different runs"):
        load_shards(prefix)


def test_no_shards_is_an_error(tmp_path):
    with pytest.raises(UserError, match="no embedding shards"):
        load_shards(str(tmp_path / "data"))


def test_shards_of_a_longer_prefix_are_not_picked_up(tmp_path):
    write_run(str(tmp_path / "data"), 6, 2, order=(1, 2))
    write_run(str(tmp_path / "data-train"), 4, 1, order=(1,))
    merged, _ = load_shards(str(tmp_path / "data"))
    assert merged["row_ids"].tolist() == list(range(6))


def test_shards_with_duplicated_rows_are_an_error(tmp_path):
    prefix = str(tmp_path / "data")
    for k in (1, 2):
        save_shard(prefix, k, 2, {"row_ids": torch.tensor([0, 1])}, {})
    with pytest.raises(UserError, match="exactly once"):
        load_shards(prefix)


# ------------------------------------------------------------------------------------- 5. gating network


def manual_gating(net, x):
    h = x
    for layer in net.layers[:-1]:
        h = torch.relu(h @ layer.weight.T + layer.bias)
    logits = h @ net.layers[-1].weight.T + net.layers[-1].bias
    return torch.softmax(logits / net.temperature, dim=-1) * net.logit_scale


def test_gating_network_layers():
    net = GatingNetwork(8, 5, hidden_dim=16, n_hidden=2)
    assert len(net.layers) == 3
    assert [tuple(layer.weight.shape) for layer in net.layers] == [(16, 8), (16, 16), (5, 16)]
    assert all(layer.bias is not None for layer in net.layers)
    default = GatingNetwork(64, 19)
    assert [tuple(layer.weight.shape) for layer in default.layers] == [(1024, 64), (1024, 1024), (1024, 1024), (19, 1024)]
    assert default.temperature == 10.0 and default.logit_scale.item() == 1.0
    assert isinstance(default.logit_scale, torch.nn.Parameter) and default.logit_scale.shape == (1,)


def test_gating_network_rows_sum_to_logit_scale_and_match_manual():
    torch.manual_seed(0)
    net = GatingNetwork(8, 5, hidden_dim=16, n_hidden=2, temperature=0.7, logit_scale=2.5).eval()
    x = torch.randn(4, 8)
    with torch.no_grad():
        out = net(x)
        assert out.shape == (4, 5)
        torch.testing.assert_close(out.sum(-1), torch.full((4,), 2.5), atol=1e-6, rtol=0)
        torch.testing.assert_close(out, manual_gating(net, x), atol=1e-6, rtol=1e-5)


def test_gating_network_temperature_divides_logits():
    torch.manual_seed(1)
    net = GatingNetwork(8, 5, hidden_dim=16, n_hidden=1, temperature=1.0).eval()
    x = torch.randn(3, 8) * 5
    with torch.no_grad():
        h = torch.relu(net.layers[0](x))
        logits = net.layers[1](h)
        for temperature in (1.0, 10.0, 0.1):
            net.temperature = temperature
            torch.testing.assert_close(net(x), torch.softmax(logits / temperature, -1), atol=1e-6, rtol=1e-5)
        net.temperature = 1.0
        sharp = net(x)
        net.temperature = 10.0
        flat = net(x)
    assert (sharp - flat).abs().max() > 1e-2  # temperature matters on these logits


def test_gating_network_softmax_over_attributes_for_3d_input():
    torch.manual_seed(2)
    net = GatingNetwork(8, 5, hidden_dim=16, n_hidden=2, temperature=1.0, logit_scale=3.0).eval()
    x = torch.randn(4, 2, 8)
    with torch.no_grad():
        out = net(x)
        assert out.shape == (4, 2, 5)
        # Each [b, j, :] sums to logit_scale (upstream's dim=1 made [b, :, k] sum to it instead).
        torch.testing.assert_close(out.sum(-1), torch.full((4, 2), 3.0), atol=1e-5, rtol=0)
        assert (out.sum(1) - 3.0).abs().max() > 1e-3
        torch.testing.assert_close(out, net(x.reshape(8, 8)).reshape(4, 2, 5), atol=1e-6, rtol=1e-5)


def test_gating_network_dropout_only_in_training():
    torch.manual_seed(3)
    net = GatingNetwork(8, 5, hidden_dim=32, n_hidden=2, temperature=1.0, dropout=0.5)
    x = torch.randn(4, 8)
    with torch.no_grad():
        net.eval()
        torch.manual_seed(10)
        a = net(x)
        torch.manual_seed(11)
        b = net(x)
        torch.testing.assert_close(a, b, atol=0, rtol=0)
        torch.testing.assert_close(a, manual_gating(net, x), atol=1e-6, rtol=1e-5)
        net.train()
        torch.manual_seed(10)
        c = net(x)
        torch.manual_seed(11)
        d = net(x)
        assert (c - d).abs().max() > 1e-4
        assert (c - a).abs().max() > 1e-4
        torch.testing.assert_close(c.sum(-1), torch.ones(4), atol=1e-6, rtol=0)
        torch.manual_seed(10)
        torch.testing.assert_close(net(x), c, atol=0, rtol=0)  # same seed, same mask
    no_dropout = GatingNetwork(8, 5, hidden_dim=32, n_hidden=2, temperature=1.0, dropout=0.0)
    no_dropout.load_state_dict(net.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(no_dropout.train()(x), a, atol=0, rtol=0)


# ---------------------------------------------------------------------------------------- 6. armo score


def test_armo_score_by_hand():
    rewards = torch.tensor([[1.0, 2.0, 3.0], [0.0, -1.0, 4.0]])
    gating = torch.tensor([[0.5, 0.25, 0.25], [0.2, 0.3, 0.5]])
    identity = torch.eye(3)
    # 0.5*1 + 0.25*2 + 0.25*3 = 1.75;  0.2*0 + 0.3*(-1) + 0.5*4 = 1.7
    torch.testing.assert_close(armo_score(rewards, gating, identity), torch.tensor([1.75, 1.7]))
    T = torch.from_numpy(transform_matrix(np.array([0.5, 0.1, 1.0]), verbosity_index=2))  # float64
    # adjusted rows: [1-1.5, 2-0.3, 0] = [-0.5, 1.7, 0] and [0-2, -1-0.4, 0] = [-2, -1.4, 0]
    # scores: 0.5*(-0.5) + 0.25*1.7 = 0.175;  0.2*(-2) + 0.3*(-1.4) = -0.82
    score = armo_score(rewards, gating, T)
    assert score.dtype == torch.float32
    torch.testing.assert_close(score, torch.tensor([0.175, -0.82]), atol=1e-6, rtol=0)


# -------------------------------------------------------------------------------------------- 7. embed


def test_load_backbone_loads_the_checkpoint_weights(backbone):
    from safetensors.torch import load_file

    model, tokenizer = backbone
    assert model.dtype == torch.float32 and not model.training
    assert tokenizer.padding_side == "right"
    state = load_file(str(ASSETS / "tiny-llama" / "model.safetensors"))
    key = next(k for k in state if k.endswith("embed_tokens.weight"))
    torch.testing.assert_close(model.get_input_embeddings().weight[:state[key].shape[0]], state[key], atol=0, rtol=0)


SEVEN = [
    [msg("user", "Hi"), msg("assistant", "Hello")],
    FOUR_TURNS,
    [msg("user", "What is two plus two?"), msg("assistant", "Four.")],
    [msg("user", "Name a colour"), msg("assistant", "Blue, or perhaps a deep shade of green on a sunny day")],
    [msg("user", "x"), msg("assistant", "y"), msg("user", "z"), msg("assistant", "w")],
    [msg("user", "Tell me a long story about a dragon and a knight"), msg("assistant", "Once upon a time.")],
    [msg("user", "ok"), msg("assistant", "sure thing, here it is, all of it")],
]


@pytest.fixture(scope="module")
def seven_sequences(tok):
    seqs = encode_conversations(tok, SEVEN)
    assert len({len(s) for s in seqs}) == 7
    return seqs


def test_embed_batched_equals_one_at_a_time(sharp_backbone, seven_sequences):
    model, tokenizer = sharp_backbone
    last, gated = embed(model, tokenizer, seven_sequences, batch_size=3, progress=False)
    assert gated is None
    assert last.shape == (7, model.config.hidden_size) and last.dtype == torch.float32
    with torch.no_grad():
        expected = torch.stack([model(input_ids=torch.tensor([s])).last_hidden_state[0, -1] for s in seven_sequences])
    torch.testing.assert_close(last, expected, atol=1e-5, rtol=0)
    # The rows differ from each other by far more than the tolerance: input order is really checked.
    assert torch.cdist(expected, expected).add(torch.eye(7) * 1e9).min() > 1e-2


def test_embed_gated_at_the_pattern_position(sharp_backbone, seven_sequences):
    model, tokenizer = sharp_backbone
    pattern = gating_pattern(tokenizer)
    last, gated = embed(model, tokenizer, seven_sequences, batch_size=3, gating_pattern_ids=pattern,
                                   progress=False)
    expected_last, expected_gated = [], []
    with torch.no_grad():
        for s in seven_sequences:
            hidden = model(input_ids=torch.tensor([s])).last_hidden_state[0]
            expected_last.append(hidden[-1])
            expected_gated.append(hidden[upstream_gating_position(s, pattern)])
    torch.testing.assert_close(last, torch.stack(expected_last), atol=1e-5, rtol=0)
    torch.testing.assert_close(gated, torch.stack(expected_gated), atol=1e-5, rtol=0)
    assert (gated - last).abs().max() > 1e-2


def test_embed_with_shipped_weights(backbone, seven_sequences):
    model, tokenizer = backbone
    last, _ = embed(model, tokenizer, seven_sequences[:4], batch_size=2, progress=False)
    with torch.no_grad():
        for i, s in enumerate(seven_sequences[:4]):
            torch.testing.assert_close(last[i], model(input_ids=torch.tensor([s])).last_hidden_state[0, -1],
                                       atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------ 8. naming


@pytest.mark.parametrize("path,name", [
    ("RLHFlow/ArmoRM-Multi-Objective-Data-v0.1", "ArmoRM-Multi-Objective-Data-v0.1"),
    ("data/x.jsonl.gz", "x"),
    ("data/x.json", "x"),
    ("some/dir/", "dir"),
    ("/models/tiny-llama", "tiny-llama"),
])
def test_dataset_name(path, name):
    assert dataset_name(path) == name


def test_embeddings_prefix():
    assert (embeddings_prefix(None, "sfairXC/FsfairX-LLaMA3-RM-v0.1", "RLHFlow/ArmoRM-Multi-Objective-Data-v0.1")
            == "./armo_data/embeddings/FsfairX-LLaMA3-RM-v0.1/ArmoRM-Multi-Objective-Data-v0.1")
    assert (embeddings_prefix(None, "/a/tiny-llama", "data/x.jsonl.gz", "train")
            == "./armo_data/embeddings/tiny-llama/x-train")
    assert embeddings_prefix("out/emb", "/a/tiny-llama", "data/x.jsonl.gz") == "out/emb/x"
    assert embeddings_prefix("e", "m", "RLHFlow/pairs", "test", source="hh") == "e/pairs-hh-test"


def test_stage_file_names():
    assert (str(regression_weights_path(None, "sfairXC/FsfairX-LLaMA3-RM-v0.1", "RLHFlow/ArmoRM-Multi-Objective-Data-v0.1"))
            == "armo_data/regression_weights/FsfairX-LLaMA3-RM-v0.1_ArmoRM-Multi-Objective-Data-v0.1.safetensors")
    assert str(regression_weights_path("w", "/a/tiny-llama/", "d.jsonl")) == "w/tiny-llama_d.safetensors"
    assert str(gating_head_dir(None, "/a/tiny-llama")) == "armo_data/gating_network/tiny-llama"
    assert str(gating_head_dir("h", "/a/tiny-llama")) == "h"


# -------------------------------------------------------------------------------- 9. validate conversations


def conversations(*rows):
    return Dataset.from_list([{"messages": m, "id": i} for i, m in enumerate(rows)])


def test_validate_conversations_names_the_row():
    ds = conversations(FOUR_TURNS, FOUR_TURNS[:3], FOUR_TURNS[:2])
    with pytest.raises(UserError) as err:
        validate_conversations(ds, False, "mo data")
    assert "row 1 (last_not_assistant)" in str(err.value)
    assert "row 0" not in str(err.value) and "row 2" not in str(err.value)
    # A conversation's own rules, not a pair's: nothing about chosen/rejected.
    assert "last_not_assistant: the last message must be the assistant's" in str(err.value)
    assert "chosen" not in str(err.value) and "rejected" not in str(err.value)
    with pytest.raises(UserError) as err:
        validate_conversations(conversations("not a list"), False, "mo data")
    assert "not_a_message_list: a conversation must be a non-empty list of {role, content} messages" in str(err.value)


def test_validate_conversations_skip_invalid_drops_and_counts():
    ds = conversations(FOUR_TURNS, FOUR_TURNS[:3], FOUR_TURNS[:2], [msg("user", "q"), msg("assistant", " ")])
    kept, stats = validate_conversations(ds, True, "mo data")
    assert kept["id"] == [0, 2]
    assert "invalid_reason" not in kept.column_names
    assert stats == {"read": 4, "invalid": {"last_not_assistant": 1, "empty_content": 1}, "used": 2}


def test_validate_conversations_needs_messages():
    with pytest.raises(UserError, match="messages"):
        validate_conversations(Dataset.from_list([{"chosen": "a"}]), False, "mo data")


# ------------------------------------------------------------------- 10. inputs the stages refuse in one line

# Gemma-2's own template refuses a system message (the tiny tokenizer with that rule added).
NO_SYSTEM_TEMPLATE = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
                      "{% endif %}" + GEMMA_TEMPLATE)


@pytest.mark.parametrize("fraction,n_train,n_val", [(0.0, 10, 0), (1.0, 0, 10), (0.99, 0, 10), (0.95, 0, 10)])
def test_split_rows_refuses_an_empty_side(fraction, n_train, n_val):
    rows = np.arange(10)
    with pytest.raises(UserError, match=rf"--val_fraction {fraction} splits 10 pairs into {n_train} train and {n_val} "
                                        r"validation rows; both need at least one"):
        split_rows(rows, fraction, 0, "pairs")
    with pytest.raises(UserError, match="splits 1 pairs into 0 train and 1 validation rows"):
        split_rows(np.arange(1), 0.2, 0, "pairs")


@pytest.mark.parametrize("n,fraction", [(10, 0.2), (2, 0.2), (7, 0.5), (600, 0.05)])
def test_split_rows_is_sklearns_split(n, fraction):
    train, val = split_rows(np.arange(n) * 3, fraction, 5, "pairs")
    expected_train, expected_val = train_test_split(np.arange(n) * 3, test_size=fraction, random_state=5)
    assert train.tolist() == expected_train.tolist() and val.tolist() == expected_val.tolist()


def test_ridge_probes_val_fraction_zero_is_one_error(probe_data):
    X, labels = probe_data["X"], probe_data["labels"]
    with pytest.raises(UserError, match="--val_fraction 0.0 splits .* embedding rows into .* train and 0 validation"):
        fit_ridge_probes(X, labels, val_fraction=0.0)


def test_regression_weights_missing_pickled_or_misshapen_are_one_error(tmp_path):
    hint = "run armo-rm/stage-1_train.py to write it (pickled .pt weights, as upstream's stage 1 saves, are not read)"
    with pytest.raises(UserError) as err:
        load_regression_weights(str(tmp_path / "none.safetensors"))
    missing = tmp_path / "none.safetensors"
    assert str(err.value) == f"--regression_weights: no regression weights file at {missing}; {hint}"
    torch.save({"weight": torch.zeros(19, 4)}, tmp_path / "upstream.pt")  # upstream's pickled weights
    with pytest.raises(UserError, match=rf"upstream.pt is not a safetensors file \(.*\); {re.escape(hint)}"):
        load_regression_weights(str(tmp_path / "upstream.pt"))
    save_file({"weight": torch.zeros(18, 4)}, tmp_path / "short.safetensors")
    with pytest.raises(UserError, match=r"has 'weight' of shape \[18, 4\], not the \[19, hidden\] regression layer"):
        load_regression_weights(str(tmp_path / "short.safetensors"))
    save_file({"w": torch.zeros(19, 4)}, tmp_path / "other.safetensors")
    with pytest.raises(UserError, match="has no 'weight' tensor"):
        load_regression_weights(str(tmp_path / "other.safetensors"))
    save_file({"weight": torch.ones(19, 4, dtype=torch.bfloat16)}, tmp_path / "ok.safetensors")
    weight = load_regression_weights(str(tmp_path / "ok.safetensors"))
    assert weight.dtype == torch.float32 and torch.equal(weight, torch.ones(19, 4))
    # fitted on another backbone's embeddings (stage 1 records it): stage 2 would build its head on the wrong probes
    save_file({"weight": torch.ones(19, 4)}, tmp_path / "fitted.safetensors",
              metadata={"json": json.dumps({"backbone": "org/model-a"})})
    assert torch.equal(load_regression_weights(str(tmp_path / "fitted.safetensors"), model_path="org/model-a"), weight)
    with pytest.raises(UserError, match="fitted.safetensors was made with the backbone org/model-a, not --model_path "
                                        "org/model-b"):
        load_regression_weights(str(tmp_path / "fitted.safetensors"), model_path="org/model-b")


def test_conversations_the_chat_template_refuses_name_the_row(tok):
    no_system = copy.deepcopy(tok)
    no_system.chat_template = NO_SYSTEM_TEMPLATE
    system = [msg("system", "Be brief.")] + FOUR_TURNS[:2]
    assert chat_template_error(no_system, system) == "System role not supported"
    assert chat_template_error(no_system, FOUR_TURNS) == "" and chat_template_error(tok, system) == ""
    pairs = Dataset.from_list([{"chosen": c, "rejected": c[:-1] + [msg("assistant", "No.")], "id": i}
                               for i, c in enumerate([FOUR_TURNS, system, FOUR_TURNS[:2], system])])
    with pytest.raises(UserError) as err:
        reject_untemplatable(pairs, no_system, ("chosen", "rejected"), False, "--dataset_path")
    assert str(err.value) == (
        "--dataset_path: 2 of 4 rows are invalid (chat_template_rejects: 2); first: row 1 (chat_template_rejects), "
        "row 3 (chat_template_rejects) (0-based). Rules: chat_template_rejects: the model's chat template must accept "
        "the conversation (it raised: 'System role not supported'). Fix the data, or pass --skip_invalid to drop them "
        "with a count.")
    kept, dropped = reject_untemplatable(pairs, no_system, ("chosen", "rejected"), True, "--dataset_path")
    assert kept["id"] == [0, 2] and dropped == 2 and set(kept.column_names) == {"chosen", "rejected", "id"}
    kept, dropped = reject_untemplatable(pairs, tok, ("chosen", "rejected"), False, "--dataset_path")
    assert kept["id"] == [0, 1, 2, 3] and dropped == 0


def test_gating_pattern_of_a_template_that_renders_nothing_is_one_error(tok):
    broken = copy.deepcopy(tok)
    broken.chat_template = "{{ raise_exception('Unsupported') }}"
    with pytest.raises(UserError, match=r"^the chat template refuses a plain user-then-assistant conversation "
                                        r"\(Unsupported\), so ArmoRM's gating position"):
        gating_pattern(broken)


def test_a_stage_refuses_what_another_backbone_made(tmp_path):
    """Embeddings and a head belong to the backbone that made them; the same local path spelled two ways is one."""
    from useful_code.armo_data import check_same_backbone

    (tmp_path / "bt").mkdir()
    check_same_backbone(str(tmp_path / "bt"), str(tmp_path / "bt" / "."), "the head")
    check_same_backbone(None, "any/model", "embeddings written before backbones were recorded")
    check_same_backbone("org/model", "org/model", "the embeddings of x")
    with pytest.raises(UserError, match=r"^the head in h was made with the backbone org/a, not --model_path org/b"):
        check_same_backbone("org/a", "org/b", "the head in h")


def test_stage2_reference_split_defaults_to_the_preference_split_under_both_recipes(capsys):
    """Upstream's README embeds the reference dataset with stage-2_prepare's default split (train) and its stage-2
    command names no split: the tiny recipe (every script's default) must not override the documented default
    (--preference_split), and the help text says so."""
    import importlib.util

    from useful_code.cli import parse_args
    from useful_code.defaults import REPO_ROOT

    spec = importlib.util.spec_from_file_location("armo_stage2_train", REPO_ROOT / "armo-rm" / "stage-2_train.py")
    stage2 = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(stage2)
    args, config = parse_args((stage2.ScriptArguments,), stage2.DEFAULT_CONFIG, section="stage-2_train", argv=[])
    assert config.endswith("tiny.yaml") and args.preference_split == "train" and args.reference_split is None
    assert (args.n_steps, args.batch_size, args.hidden_size) == (500, 256, 256)  # the recipe's other fields still apply
    args, _ = parse_args((stage2.ScriptArguments,), stage2.DEFAULT_CONFIG, section="stage-2_train",
                         argv=["--preference_split", "test"])
    assert args.reference_split is None  # main() falls back to --preference_split: "test" here
    llama = str(REPO_ROOT / "armo-rm" / "configs" / "llama3-8b.yaml")
    args, _ = parse_args((stage2.ScriptArguments,), None, section="stage-2_train", argv=[llama])
    assert (args.reference_dataset, args.reference_split) == ("RLHFlow/UltraFeedback-preference-standard", "train")
    with pytest.raises(SystemExit):
        parse_args((stage2.ScriptArguments,), stage2.DEFAULT_CONFIG, section="stage-2_train", argv=["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--reference_split REFERENCE_SPLIT, --reference-split REFERENCE_SPLIT Default: --preference_split (train)" \
        in help_text


def test_a_correlation_exactly_at_the_threshold_is_low_enough():
    """Upstream's rule is rho <= threshold: an attribute whose first penalty brings it exactly there takes it."""
    rng = np.random.default_rng(0)
    verbosity = rng.normal(size=20)
    rewards = np.stack([verbosity + rng.normal(size=20), verbosity], axis=1)
    rho = spearmanr(rewards[:, 0], verbosity).statistic  # penalty 0 leaves the attribute as it is
    out = verbosity_penalties(rewards, verbosity_index=1, threshold=rho)
    assert out["penalty"][0] == 0 and out["corr"][0] == rho


def test_attribute_labels_are_numbers_or_null():
    """A label that is a string, a boolean or an infinity is named with its row (as in the file) and attribute before
    any embedding; null and NaN mean not rated; --skip_invalid drops and counts."""
    rated = {a: None for a in ATTRIBUTES}
    rows = [{**rated, ATTRIBUTES[0]: 3.5}, {**rated, ATTRIBUTES[3]: float("nan")}, {**rated, ATTRIBUTES[2]: True},
            {**rated, ATTRIBUTES[5]: float("inf")}, {**rated, ATTRIBUTES[1]: 2}]
    data = Dataset.from_list(rows)
    with pytest.raises(UserError, match=rf"2 of 5 rows are invalid \(bad_attribute_label: 2\); first: row 2 "
                                        rf"{ATTRIBUTES[2]} \(bad_attribute_label\), row 3 {ATTRIBUTES[5]} "):
        validate_attribute_labels(data, False, "--dataset_path")
    kept, stats = validate_attribute_labels(data, True, "--dataset_path")
    assert (stats["read"], stats["used"], stats["invalid"]) == (5, 3, {"bad_attribute_label": 2})
    assert kept[ATTRIBUTES[1]] == [None, None, 2]
    text = Dataset.from_list([{**rated, ATTRIBUTES[0]: "high"}, {**rated, ATTRIBUTES[0]: None}])
    with pytest.raises(UserError, match=rf"first: row 0 {ATTRIBUTES[0]} \(bad_attribute_label\)"):
        validate_attribute_labels(text, False, "--dataset_path")


def test_the_export_does_not_carry_a_bt_backbones_reward_scale(tmp_path):
    """A BT checkpoint's config.json holds its held-out reward mean and std under OpenRLHF's names, which OpenRLHF
    normalizes rewards by: the exported ArmoRM's score is another scale, so they are not copied into its config."""
    import importlib.util

    from transformers import AutoConfig

    from useful_code.checkpoints import record_reward_scale
    from useful_code.defaults import REPO_ROOT

    AutoConfig.from_pretrained(DEFAULT_MODEL).save_pretrained(tmp_path)
    record_reward_scale(str(tmp_path), 0.29, 1.62)
    spec = importlib.util.spec_from_file_location("armo_export", REPO_ROOT / "armo-rm" / "export.py")
    export = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(export)
    summary = {"attributes": ["a", "b"], "gating_hidden_dim": 8, "gating_n_hidden": 1, "gating_temperature": 10.0,
               "penalty": [0.0, 0.0]}
    config = export.build_config(str(tmp_path), summary, [1, 2], False).to_dict()
    assert "mean" not in config and "std" not in config and config["num_objectives"] == 2


def test_embed_refuses_non_finite_hidden_states_naming_the_sequence(backbone, seven_sequences):
    """A NaN embedding written to disk stopped stage 1's ridge fit with a scikit-learn traceback, long after: embed
    names the first sequence (packed and padded paths alike)."""
    import copy

    model, tokenizer = backbone
    broken = copy.deepcopy(model)
    word = seven_sequences[5][-3]  # a token of the sixth sequence only
    assert all(word not in s for i, s in enumerate(seven_sequences) if i != 5)
    with torch.no_grad():
        broken.get_input_embeddings().weight[word] = float("nan")
    for budget in (0, 4096):
        with pytest.raises(UserError, match=r"the model gave NaN or infinite hidden states for 1 of 7 sequences "
                                            r"\(first: sequence 5 to embed\)"):
            embed(broken, tokenizer, seven_sequences, batch_size=3, progress=False, max_tokens_per_batch=budget)
