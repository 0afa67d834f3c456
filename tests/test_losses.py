"""Tests of useful_code/losses.py: the loss variants (TRL margin / centering, scaled BT, ODIN) and the collator's
per-pair columns. Expected values are written out by hand; softplus(x) = log(1 + e^x) = -log sigmoid(-x)."""

import math

import numpy as np
import pytest
import torch

from useful_code.defaults import DEFAULT_MODEL
from useful_code.losses import (
    LOSS_VARIANTS,
    ODIN_PARTS,
    PairwiseCollator,
    bradley_terry_loss,
    head_orthogonality,
    odin_loss,
    pairwise_loss,
    pearson_correlation,
    required_columns,
)
from useful_code.templates import load_tokenizer

SP_HALF, SP_MINUS_HALF = 0.9740769841801067, 0.4740769841801067  # softplus(0.5), softplus(-0.5)
SP_ONE, SP_MINUS_ONE, SP_TWO = 1.3132616875182228, 0.31326168751822286, 2.1269280110429727  # softplus(1, -1, 2)
RHO_STEP = 9 / math.sqrt(105)  # Pearson([0, 0, 0, 1, 1, 1], [1, ..., 6]) = 4.5 / sqrt(1.5 * 17.5) = 0.87831
T = torch.tensor


def test_softplus_constants():
    for x, value in [(0.5, SP_HALF), (-0.5, SP_MINUS_HALF), (1, SP_ONE), (-1, SP_MINUS_ONE), (2, SP_TWO)]:
        assert math.log1p(math.exp(x)) == pytest.approx(value, abs=1e-12)


# ------------------------------------------------------------------------------------------ pairwise_loss


def test_margin_by_hand():
    # diffs r_c - r_r - margin = [1 - 0 - 0.5, 0 - 0.5 - 0] = [0.5, -0.5]
    loss = pairwise_loss(T([1.0, 0.0]), T([0.0, 0.5]), margin=T([0.5, 0.0]))
    assert loss.item() == pytest.approx((SP_MINUS_HALF + SP_HALF) / 2, abs=1e-6)  # 0.724077
    assert loss.item() == pytest.approx(0.7240769841801067, abs=1e-6)
    # a margin raises the loss of the same rewards (TRL subtracts it inside the sigmoid)
    assert loss.item() > pairwise_loss(T([1.0, 0.0]), T([0.0, 0.5])).item()


def test_weight_by_hand_normalised_by_n():
    # diffs [1, -0.5]: (2 * softplus(-1) + 0.5 * softplus(0.5)) / 2 pairs (not / sum(w) = 2.5)
    loss = pairwise_loss(T([1.0, 0.0]), T([0.0, 0.5]), weight=T([2.0, 0.5]))
    assert loss.item() == pytest.approx((2 * SP_MINUS_ONE + 0.5 * SP_HALF) / 2, abs=1e-6)  # 0.556781
    assert loss.item() != pytest.approx((2 * SP_MINUS_ONE + 0.5 * SP_HALF) / 2.5, abs=1e-3)
    ones = pairwise_loss(T([1.0, 0.0]), T([0.0, 0.5]), weight=T([1.0, 1.0]))
    assert ones.item() == pytest.approx(bradley_terry_loss(T([1.0, 0.0]), T([0.0, 0.5])).item(), abs=1e-7)


def test_margin_and_weight_together():
    loss = pairwise_loss(T([1.0, 0.0]), T([0.0, 0.5]), margin=T([0.5, 0.0]), weight=T([2.0, 0.0]))
    assert loss.item() == pytest.approx(2 * SP_MINUS_HALF / 2, abs=1e-6)


def test_centering_by_hand():
    # mean((r_c + r_r)^2) = mean(1, 0.25) = 0.625
    loss = pairwise_loss(T([1.0, 0.0]), T([0.0, 0.5]), center_rewards_coefficient=0.01)
    assert loss.item() == pytest.approx((SP_MINUS_ONE + SP_HALF) / 2 + 0.01 * 0.625, abs=1e-6)  # 0.649919
    # zero-sum rewards are not penalised: softplus(-2) only
    assert pairwise_loss(T([1.0]), T([-1.0]), center_rewards_coefficient=5.0).item() == pytest.approx(
        math.log1p(math.exp(-2)), abs=1e-6)


def test_no_options_equals_bradley_terry():
    chosen, rejected = T([0.3, -1.2, 2.0, 0.0]), T([0.1, 0.4, -2.5, 0.0])
    expected = (math.log1p(math.exp(-0.2)) + math.log1p(math.exp(1.6)) + math.log1p(math.exp(-4.5)) + math.log(2)) / 4
    assert pairwise_loss(chosen, rejected).item() == pytest.approx(expected, abs=1e-6)
    assert bradley_terry_loss(chosen, rejected).item() == pairwise_loss(chosen, rejected).item()
    assert pairwise_loss(chosen, rejected, center_rewards_coefficient=None).item() == pytest.approx(expected, abs=1e-6)


def test_bf16_inputs_give_the_float32_result():
    chosen, rejected, margin, weight = T([1.0, 0.0]), T([0.0, 0.5]), T([0.5, 0.0]), T([2.0, 0.5])
    reference = pairwise_loss(chosen, rejected, margin, weight, center_rewards_coefficient=0.01)
    bf16 = pairwise_loss(chosen.bfloat16(), rejected.bfloat16(), margin.bfloat16(), weight.bfloat16(),
                         center_rewards_coefficient=0.01)
    assert bf16.dtype == torch.float32
    assert bf16.item() == reference.item()  # every input is exact in bf16: nothing may be computed in bf16
    assert reference.item() == pytest.approx((2 * SP_MINUS_HALF + 0.5 * SP_HALF) / 2 + 0.01 * 0.625, abs=1e-6)


def test_gradients_flow_and_point_the_right_way():
    chosen = T([1.0, 0.0, -3.0], requires_grad=True)
    rejected = T([0.0, 0.5, 2.0], requires_grad=True)
    pairwise_loss(chosen, rejected, margin=T([0.5, 0.0, 1.0]), weight=T([1.0, 2.0, 0.5]),
                  center_rewards_coefficient=0.1).backward()
    assert torch.isfinite(chosen.grad).all() and torch.isfinite(rejected.grad).all()
    assert (chosen.grad < 0).all() and (rejected.grad[:2] > 0).all()  # raise chosen, lower rejected
    # d/dr_c of w * softplus(-(r_c - r_r - m)) / n = -w * sigmoid(-(diff)) / n, plus 0.1 * 2 * (r_c + r_r) / n
    expected = -1.0 * torch.sigmoid(T(-0.5)) / 3 + 0.1 * 2 * 1.0 / 3
    assert chosen.grad[0].item() == pytest.approx(expected.item(), abs=1e-6)


def test_shape_mismatches_raise():
    with pytest.raises(ValueError, match="shape"):
        pairwise_loss(T([1.0, 0.0]), T([[0.0], [0.5]]))
    with pytest.raises(ValueError, match="margin has 3 values for 2 pairs"):
        pairwise_loss(T([1.0, 0.0]), T([0.0, 0.5]), margin=T([0.5, 0.0, 1.0]))


def test_loss_variants_and_required_columns():
    assert set(LOSS_VARIANTS) == {"bt", "margin", "scaled", "odin"}
    assert all(isinstance(text, str) and text for text in LOSS_VARIANTS.values())
    assert required_columns("bt") == ()
    assert required_columns("margin") == ("margin",)
    assert required_columns("scaled") == ("weight",)
    assert required_columns("odin") == ()
    with pytest.raises(ValueError, match="hinge"):
        required_columns("hinge")


# ------------------------------------------------------------------------------------------ collator


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(DEFAULT_MODEL, "m")


FEATURES = [
    {"chosen_input_ids": [0, 10, 6], "rejected_input_ids": [0, 11, 12, 6]},
    {"chosen_input_ids": [0, 14, 15, 6], "rejected_input_ids": [0, 6]},
]


def test_collator_without_columns_is_unchanged(tok):
    batch = PairwiseCollator(tok)(FEATURES)
    assert set(batch) == {"input_ids", "attention_mask", "real_tokens"}
    assert batch["input_ids"].tolist() == [[0, 10, 6, 2], [0, 14, 15, 6], [0, 11, 12, 6], [0, 6, 2, 2]]
    # columns present but None in every row (e.g. an Arrow column of nulls) are absent too
    plain = {"input_ids", "attention_mask", "real_tokens"}
    assert set(PairwiseCollator(tok)([{**f, "margin": None} for f in FEATURES])) == plain


def test_collator_passes_per_pair_columns(tok):
    extra = [{"margin": 0.5, "weight": 2, "chosen_length": 3, "rejected_length": 4},
             {"margin": np.float64(0.0), "weight": 0.25, "chosen_length": 4, "rejected_length": 2}]
    batch = PairwiseCollator(tok)([{**f, **e} for f, e in zip(FEATURES, extra)])
    assert set(batch) == {"input_ids", "attention_mask", "real_tokens", "margin", "weight", "chosen_length",
                          "rejected_length"}
    assert batch["margin"].tolist() == [0.5, 0.0]
    assert batch["weight"].tolist() == [2.0, 0.25]
    assert batch["chosen_length"].tolist() == [3.0, 4.0]
    assert batch["rejected_length"].tolist() == [4.0, 2.0]
    for name in ("margin", "weight", "chosen_length", "rejected_length"):
        assert batch[name].dtype == torch.float32 and batch[name].shape == (2,)
    only_margin = PairwiseCollator(tok)([{**FEATURES[0], "margin": 1}, {**FEATURES[1], "margin": 2}])
    assert set(only_margin) == {"input_ids", "attention_mask", "real_tokens", "margin"}


def test_collator_mixed_none_raises(tok):
    with pytest.raises(ValueError, match="'weight'"):
        PairwiseCollator(tok)([{**FEATURES[0], "weight": 1.0}, {**FEATURES[1], "weight": None}])
    with pytest.raises(ValueError, match="'margin'"):
        PairwiseCollator(tok)([{**FEATURES[0], "margin": 1.0}, FEATURES[1]])  # key missing in one row
    with pytest.raises(ValueError, match="'margin'.*non-finite"):
        PairwiseCollator(tok)([{**FEATURES[0], "margin": float("nan")}, {**FEATURES[1], "margin": 1.0}])


# ------------------------------------------------------------------------------------------ ODIN


def test_pearson_matches_numpy():
    rng = np.random.default_rng(0)
    for _ in range(5):
        x, y = rng.normal(size=8), rng.normal(size=8) + np.linspace(0, 3, 8)
        expected = np.corrcoef(x, y)[0, 1]
        assert pearson_correlation(T(x), T(y)).item() == pytest.approx(expected, abs=1e-5)
    assert pearson_correlation(T([0.0, 0, 0, 1, 1, 1]), T([1.0, 2, 3, 4, 5, 6])).item() == pytest.approx(RHO_STEP)
    assert pearson_correlation(T([3.0, 1.0]), T([-1.0, 5.0])).item() == pytest.approx(-1.0)
    # rewards near 1e20 (a run going wrong): float32's squared deviations overflowed and the correlation read 0
    x, y = [1e20, -1e20, 3e19, 5e19], [10.0, 200.0, 30.0, 40.0]
    rho = pearson_correlation(T(x), T(y))
    assert rho.dtype == torch.float32 and rho.item() == pytest.approx(np.corrcoef(x, y)[0, 1], abs=1e-5)


def test_pearson_constant_input_is_zero_with_finite_gradient():
    for constant in (T([0.1, 0.1, 0.1]), T([0.0, 0.0, 0.0]), T([1e6, 1e6, 1e6])):
        x = constant.clone().requires_grad_(True)
        rho = pearson_correlation(x, T([1.0, 2.0, 4.0]))
        assert rho.item() == 0.0 and not math.isnan(rho.item())
        rho.backward()
        assert torch.isfinite(x.grad).all()
    assert pearson_correlation(T([1.0, 2.0, 4.0]), T([7.0, 7.0, 7.0])).item() == 0.0


def test_head_orthogonality_by_hand():
    # rows e1, e2 centred: [2, -1, -1] / 3 and [-1, 2, -1] / 3; cos = (-2 - 2 + 1) / 6 = -0.5
    assert head_orthogonality(T([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])).item() == pytest.approx(0.5)
    # scale-free: shrinking a head does not lower it
    assert head_orthogonality(T([[1.0, 0.0, 0.0], [0.0, 1e-3, 0.0]])).item() == pytest.approx(0.5)
    assert head_orthogonality(T([[1.0, -1.0, 0.0], [1.0, 1.0, -2.0]])).item() == pytest.approx(0.0, abs=1e-7)
    with pytest.raises(ValueError, match="head_weights"):
        head_orthogonality(torch.empty(0))  # what a ZeRO-3 partitioned score.weight looks like


def floats(parts: dict) -> dict:
    return {name: value.item() for name, value in parts.items()}


def test_odin_parts_by_hand():
    # pooled lengths [1..6]; pooled quality [1, -1, -1, 1, 0, 0] is uncorrelated with them (dot with the centred
    # lengths: -2.5 + 1.5 + 0.5 + 0.5 = 0); pooled length head [0, 0, 0, 1, 1, 1] has rho = 9 / sqrt(105).
    # BT on q + l: diffs (1 + 0) - (1 + 1) = -1, (-1) - (0 + 1) = -2, -2.
    loss, tensors = odin_loss(T([1.0, -1.0, -1.0]), T([1.0, 0.0, 0.0]), T([0.0, 0.0, 0.0]), T([1.0, 1.0, 1.0]),
                              T([1.0, 2.0, 3.0]), T([4.0, 5.0, 6.0]),
                              head_weights=T([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]))
    # detached values on the loss's device, read when logged: no step waits for them
    assert list(tensors) == list(ODIN_PARTS)
    assert all(v.shape == () and v.dtype == torch.float32 and not v.requires_grad for v in tensors.values())
    parts = floats(tensors)
    bt = (SP_ONE + 2 * SP_TWO) / 3  # 1.855706
    assert parts["bt"] == pytest.approx(bt, abs=1e-6)
    assert parts["rho_quality"] == pytest.approx(0.0, abs=1e-7)
    assert parts["rho_length"] == pytest.approx(RHO_STEP, abs=1e-6)
    assert parts["length"] == pytest.approx(1 - RHO_STEP, abs=1e-6)  # 0.121690
    assert parts["ortho"] == pytest.approx(0.5, abs=1e-6)
    assert loss.item() == parts["loss"] == pytest.approx(bt + 1 - RHO_STEP + 0.5, abs=1e-6)  # 2.477396


def test_odin_abs_and_coefficients():
    # quality pooled [0, 0, 0, -1, -1, -1]: rho = -9 / sqrt(105), |rho| cancels 1 - rho_length: length term = 1.
    # BT diffs (0 + 0) - (-1 + 1) = 0: log 2. No head weights: no ortho term.
    args = (T([0.0, 0.0, 0.0]), T([-1.0, -1.0, -1.0]), T([0.0, 0.0, 0.0]), T([1.0, 1.0, 1.0]),
            T([1.0, 2.0, 3.0]), T([4.0, 5.0, 6.0]))
    loss, parts = odin_loss(*args, length_coefficient=0.5)
    parts = floats(parts)
    assert parts["rho_quality"] == pytest.approx(-RHO_STEP, abs=1e-6)
    assert parts["length"] == pytest.approx(1.0, abs=1e-6)
    assert parts["ortho"] == 0.0
    assert loss.item() == pytest.approx(math.log(2) + 0.5, abs=1e-6)
    loss, _ = odin_loss(*args, head_weights=T([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]), length_coefficient=0.0,
                        ortho_coefficient=2.0)
    assert loss.item() == pytest.approx(math.log(2) + 2 * 0.5, abs=1e-6)


def test_odin_bf16_and_gradients():
    q_c, q_r = T([1.0, -1.0, 0.5], requires_grad=True), T([0.25, 0.0, 2.0], requires_grad=True)
    lengths = (T([10.0, 20.0, 30.0]), T([15.0, 5.0, 40.0]))
    heads = T([[1.0, 0.5, 0.0], [0.0, 1.0, 2.0]], requires_grad=True)
    loss, parts = odin_loss(q_c, q_r, q_c * 0.5, q_r * 0.25, *lengths, head_weights=heads)
    loss.backward()
    assert torch.isfinite(q_c.grad).all() and torch.isfinite(q_r.grad).all() and torch.isfinite(heads.grad).all()
    low, _ = odin_loss(q_c.detach().bfloat16(), q_r.detach().bfloat16(), (q_c * 0.5).detach().bfloat16(),
                       (q_r * 0.25).detach().bfloat16(), *lengths, head_weights=heads.detach().bfloat16())
    assert low.dtype == torch.float32 and low.item() == pytest.approx(parts["loss"].item(), abs=1e-6)


def one_odin_step(length_coefficient: float) -> tuple[dict, dict]:
    """One SGD step on a toy linear reward model; the ODIN parts before and after it. Feature 0 is the response
    length (standardised), the others are noise; the quality head starts leaning on length."""
    generator = torch.Generator().manual_seed(0)
    n_pairs, dim = 16, 6
    lengths = torch.randint(10, 200, (2 * n_pairs,), generator=generator).float()
    features = torch.randn(2 * n_pairs, dim, generator=generator)
    features[:, 0] = (lengths - lengths.mean()) / lengths.std()
    heads = torch.nn.Linear(dim, 2, bias=False)  # row 0: quality, row 1: length
    with torch.no_grad():
        heads.weight.copy_(torch.randn(2, dim, generator=generator) * 0.3)
        heads.weight[0, 0] = 0.3
    optimizer = torch.optim.SGD(heads.parameters(), lr=0.1)
    history = []
    for _ in range(2):  # parts are computed before each update: the second call sees the stepped weights
        rewards = heads(features)
        quality, length_head = rewards[:, 0], rewards[:, 1]
        loss, parts = odin_loss(quality[:n_pairs], quality[n_pairs:], length_head[:n_pairs], length_head[n_pairs:],
                                lengths[:n_pairs], lengths[n_pairs:], head_weights=heads.weight,
                                length_coefficient=length_coefficient)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append(floats(parts))
    return history[0], history[1]


def test_odin_step_decorrelates_quality_head_from_length():
    before, after = one_odin_step(length_coefficient=1.0)
    assert before["rho_quality"] == pytest.approx(0.7295, abs=1e-3)
    assert abs(after["rho_quality"]) < abs(before["rho_quality"]) - 0.2  # 0.73 -> 0.43
    assert after["rho_length"] > before["rho_length"] + 0.2  # the length head takes the length signal
    # control: the same step without the length term does not lower the quality head's correlation
    before, after = one_odin_step(length_coefficient=0.0)
    assert abs(after["rho_quality"]) >= abs(before["rho_quality"])
