"""Hidden-state, attention and influence terms (issue 13): their formulas, gradients and how peers use them."""

import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

from codistill.data import load_dataset
from codistill.engine import LocalEngine
from codistill.errors import ConfigError
from codistill.exchange import in_memory_board, make_exchange
from codistill.losses.hidden import attention_kl, attention_mse, hidden_mse, layer_map, projection, relation_scores
from codistill.losses.weighting import distillation_influence, normalized
from tests.helpers import lm_job, make_peer, small_job

TERMS = "loss.terms=[{name: logits}, {name: hidden_mse, weight: 0.1}, {name: attention_kl}, {name: attention_mse}]"


def test_hidden_mse_is_zero_at_the_projected_teacher_and_its_gradient_never_reaches_the_teacher():
    torch.manual_seed(0)
    proj = projection(6, 4, feature_map=False)  # widths differ: a learned 6 -> 4 map
    student = torch.randn(3, 5, 6, requires_grad=True)  # (B, T, C_s)
    with torch.no_grad():
        teacher = proj(student).clone().requires_grad_(True)  # (B, T, C_t) exactly the projected student
    assert hidden_mse(student, teacher, proj).abs().max() == 0
    other = torch.randn(3, 5, 4, requires_grad=True)
    loss = hidden_mse(student, other, proj)
    assert loss.shape == (3,) and (loss > 0).all()
    loss.sum().backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    weight = proj.weight
    assert isinstance(weight, torch.Tensor) and weight.grad is not None and weight.grad.abs().sum() > 0
    assert other.grad is None  # teacher tensors are detached


def test_hidden_mse_on_feature_maps_uses_a_1x1_conv_and_pools_to_the_smaller_map():
    proj = projection(8, 16, feature_map=True)
    assert isinstance(proj, nn.Conv2d) and proj.kernel_size == (1, 1)
    student = torch.randn(2, 8, 8, 8)
    teacher = F.avg_pool2d(proj(student), 2).detach()  # the teacher's map is half the size
    assert torch.allclose(hidden_mse(student, teacher, proj), torch.zeros(2), atol=1e-6)
    vector = torch.randn(2, 16)  # an MLP teacher's hidden vector: the student's map is pooled to one
    assert hidden_mse(student, vector, proj).shape == (2,)
    dense = projection(16, 8, feature_map=False)
    pooled = proj(student).mean((2, 3)).detach()
    identity = projection(16, 16, feature_map=False)
    assert torch.allclose(hidden_mse(pooled, proj(student).detach(), identity), torch.zeros(2), atol=1e-6)
    assert hidden_mse(vector, student, dense).shape == (2,)  # an MLP student facing a feature map
    same = projection(5, 5, feature_map=False)
    x = torch.randn(4, 5)
    assert torch.equal(same(x), x)  # equal widths start as the identity


def test_layer_maps_follow_tinybert_uniform_and_minilm_last():
    assert layer_map("uniform", 3, 5) == [(0, 0), (1, 2), (2, 4)]  # embedding, middle, last
    assert layer_map("uniform", 5, 3) == [(0, 0), (1, 0), (2, 1), (3, 1), (4, 2)]  # a deeper student
    assert layer_map("last", 3, 7) == [(2, 6)]
    assert layer_map([[0, -1], [-1, 0]], 3, 4) == [(0, 3), (2, 0)]
    with pytest.raises(ValueError, match="out of range"):
        layer_map([[3, 0]], 3, 4)


def test_attention_kl_is_zero_for_equal_attention_non_negative_and_works_across_head_counts():
    torch.manual_seed(1)
    qkv = torch.randn(2, 6, 3 * 8)
    for causal in (True, False):
        assert attention_kl(qkv, qkv, 2, ("qk", "vv"), causal).abs().max() < 1e-6
        assert attention_mse(qkv, qkv, 2, causal).abs().max() == 0
    student = torch.randn(2, 6, 3 * 8, requires_grad=True)  # width 8 (e.g. 2 heads of 4)
    teacher = torch.randn(2, 6, 3 * 12, requires_grad=True)  # width 12 (e.g. 4 heads of 3): relation heads 2
    kl = attention_kl(student, teacher, 2, ("qk", "qq", "kk", "vv"), True)
    assert kl.shape == (2,) and (kl > 0).all()
    kl.sum().backward()
    assert student.grad is not None and teacher.grad is None
    scores = relation_scores(teacher.detach(), 2, "qk", causal=True)
    assert scores.shape == (2, 2, 6, 6) and (scores[..., 0, 1:] < -1e8).all()  # row 0 sees only itself


def _tiny_classifier():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))


def _kl_per_example(model, params, x, teacher_logits, temperature=2.0):
    logits = functional_call(model, params, (x,))
    log_q = F.log_softmax(logits / temperature, -1)
    log_p = F.log_softmax(teacher_logits / temperature, -1)
    return temperature**2 * (log_p.exp() * (log_p - log_q)).sum(-1)


def test_finite_difference_influence_matches_exact_per_example_gradients():
    """LGTM's finite difference against g . grad l_n computed per example with torch.func."""
    model = _tiny_classifier()
    g = torch.Generator().manual_seed(3)
    x, teacher = torch.randn(32, 5, generator=g), torch.randn(32, 3, generator=g) * 2
    val_x, val_y = torch.randn(64, 5, generator=g), torch.randint(0, 3, (64,), generator=g)
    params = dict(model.named_parameters())

    def validation_loss():
        return F.cross_entropy(model(val_x), val_y)

    estimate = distillation_influence(
        params, validation_loss, lambda moved: _kl_per_example(model, moved, x, teacher), eps=1e-3
    )
    val_grad = torch.autograd.grad(validation_loss(), list(params.values()))
    detached = {k: v.detach() for k, v in params.items()}

    def one(p, xi, ti):
        return _kl_per_example(model, p, xi[None], ti[None])[0]

    per_example = vmap(grad(one), in_dims=(None, 0, 0))(detached, x, teacher)  # name -> (B, *shape)
    exact = sum((per_example[k] * vg).flatten(1).sum(1) for k, vg in zip(params, val_grad))
    corr = torch.corrcoef(torch.stack([estimate, exact]))[0, 1]
    assert corr > 0.99, corr
    assert torch.allclose(estimate, exact, rtol=0.05, atol=1e-3 * exact.abs().max())
    for k, p in params.items():  # the parameters were never moved
        assert torch.equal(p, detached[k])


def test_an_example_that_helps_validation_gets_a_positive_weight_and_one_that_hurts_a_negative_one():
    torch.manual_seed(0)
    model = nn.Linear(2, 2)
    val_x, val_y = torch.tensor([[1.0, 0.0]]).repeat(8, 1), torch.zeros(8, dtype=torch.long)  # e1 is class 0
    x = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    teacher = torch.tensor([[4.0, -4.0], [-4.0, 4.0], [0.0, 0.0]])  # right, wrong, and an unrelated input
    params = dict(model.named_parameters())
    w = distillation_influence(
        params,
        lambda: F.cross_entropy(model(val_x), val_y),
        lambda moved: _kl_per_example(model, moved, x, teacher, 1.0),
        eps=1e-3,
    )
    assert w[0] > 0 and w[1] < 0, w
    n = normalized(w)
    assert n.abs().mean() == pytest.approx(1.0) and torch.equal(torch.sign(n), torch.sign(w))


def test_terms_configs_are_checked_before_training(tmp_path):
    with pytest.raises(ConfigError, match=r"loss.terms.0.layers: .*not set: logits takes only name and weight"):
        lm_job(tmp_path, "loss.terms=[{name: logits, layers: last}]")
    with pytest.raises(ConfigError, match=r"loss.terms.1.name: .*allowed"):
        lm_job(tmp_path, "loss.terms=[{name: logits}, {name: hidden}]")
    with pytest.raises(ConfigError, match=r"data.validation_fraction: .*loss.weighting=influence"):
        lm_job(tmp_path, "loss.weighting=influence")
    with pytest.raises(ConfigError, match=r"loss.influence_side: .*topology all"):
        small_job("loss.weighting=influence", "data.validation_fraction=0.1", "exchange.topology=ring")
    cfg = small_job("loss.terms=[{name: attention_kl}]")  # an MLP has no attention layers: one line at the peer
    with pytest.raises(ConfigError, match=r"loss.terms: .*attention_kl needs attention layers"):
        make_peer(cfg, 0, load_dataset(cfg.data))
    cfg = lm_job(tmp_path, "loss.terms=[{name: attention_kl, relation_heads: 5}]")
    with pytest.raises(ConfigError, match=r"5 relation heads do not divide the widths \[32, 48\]"):
        make_peer(cfg, 0, load_dataset(cfg.data))


def test_projections_are_trained_and_kept_in_training_checkpoints(tmp_path):
    cfg = lm_job(tmp_path, TERMS, steps=4)
    ds = load_dataset(cfg.data)
    peers = [make_peer(cfg, i, ds) for i in range(2)]
    assert peers[0].publish_taps and peers[0].student_taps  # what the other's terms read, and its own
    heads = dict(peers[0].heads.named_parameters())
    assert heads and all(
        any(p is q for g in peers[0].optimizer.param_groups for q in g["params"]) for p in heads.values()
    )
    before = {k: v.detach().clone() for k, v in heads.items()}
    board = in_memory_board(cfg)
    exchanges = [make_exchange(cfg, i, board) for i in range(2)]
    for step in range(2):
        for p, e in zip(peers, exchanges):
            e.start_step(p, step)
        teachers = [e.teacher_signals(p, step) for p, e in zip(peers, exchanges)]
        for p, t in zip(peers, teachers):
            assert t is not None and set(t[0].taps) == set(p.teacher_taps[t[0].index])
            p.train_step(t)
    assert any(not torch.equal(before[k], v) for k, v in peers[0].heads.named_parameters())  # trained
    state = peers[0].training_state()
    fresh = make_peer(cfg, 0, ds)
    fresh.load_training_state(state)
    for k, v in peers[0].heads.state_dict().items():
        assert torch.equal(fresh.heads.state_dict()[k], v)
    steps = [s.terms for s in peers[0].take_losses()]
    assert steps[0] is not None
    assert set(steps[0]) == {"term.logits", "term.hidden_mse", "term.attention_kl", "term.attention_mse"}


@pytest.mark.parametrize(
    "mode",
    [
        ("exchange.mode=logits", "loss.influence_side=teacher"),  # weights beside the logit shards
        ("exchange.mode=checkpoint", "exchange.period=3", "loss.influence_side=both"),  # local copies
    ],
)
def test_every_term_and_influence_runs_with_both_exchanges(tmp_path, mode):
    cfg = lm_job(tmp_path, TERMS, "loss.weighting=influence", "data.validation_fraction=0.1", *mode, steps=8)
    history = LocalEngine(cfg).run(tmp_path / "out")
    for p in history[-1].peers:
        assert {"term.hidden_mse", "term.attention_kl", "influence_mean", "influence_negative"} <= set(p.terms)
        assert 0 <= p.terms["influence_negative"] <= 1


def test_a_job_without_terms_reads_no_taps_and_has_no_heads():
    cfg = small_job()
    assert cfg.loss.default_terms
    peer = make_peer(cfg, 0, load_dataset(cfg.data))
    assert not peer.student_taps and not peer.publish_taps and len(peer.heads) == 0 and not peer.extra_names


def test_cnn_feature_map_terms_on_checkpoint_exchange(tmp_path):
    cfg = small_job(
        "exchange.mode=checkpoint",
        "exchange.period=4",
        "loss.terms=[{name: logits}, {name: hidden_mse}]",
        "peers.1.model_args={width: 8}",
        models=("cnn", "cnn"),
        steps=10,
    )
    history = LocalEngine(cfg).run(tmp_path)
    assert all(p.terms["term.hidden_mse"] > 0 and p.terms["term.logits"] > 0 for p in history[-1].peers)


@pytest.mark.parametrize("job", ["lm_tinybert", "fmnist_influence", "digits_fitnets"])
def test_the_issue_jobs_run_on_a_cpu(tmp_path, job):
    """The three jobs of issue 13 as shipped, shortened (LocalEngine; Fashion-MNIST as a small file in the
    same Parquet layout when the real one is not beside the checkout)."""
    from codistill.run import main
    from tests.helpers import SHARED_DATASETS
    from tests.unit.test_bad_input import grey, write_parquet

    sets = ["steps=6", "eval_every=3", "engine=local", "tracking=none", "device=cpu"]
    if job == "lm_tinybert":
        sets += ["data.max_chars=60000", "data.limit_test=16", "data.batch_size=8", f"data.root={tmp_path / 'cache'}"]
    if job == "fmnist_influence":
        folder = SHARED_DATASETS / "fashion_mnist"
        if not (folder / "train.parquet").exists():
            folder = tmp_path
            write_parquet(folder / "train.parquet", grey(200, 28), [i % 10 for i in range(200)])
            write_parquet(folder / "test.parquet", grey(20, 28, seed=1), [i % 10 for i in range(20)])
        sets += [f"data.train={folder / 'train.parquet'}", f"data.test={folder / 'test.parquet'}"]
        sets += ["data.limit_train=400", "data.limit_test=50", "loss.influence_every=1"]
    if job == "digits_fitnets":
        sets += ["loss.burn_in=0", "exchange.period=2"]  # distil within six steps
    args = ["--config", job, "--output", str(tmp_path / "run")] + [a for s in sets for a in ("--set", s)]
    assert main(args) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    terms = set(summary["peers"][0]["terms"])
    expected = {
        "lm_tinybert": {"term.logits", "term.hidden_mse", "term.attention_kl"},
        "fmnist_influence": {"term.logits", "influence_mean", "influence_std", "influence_negative"},
        "digits_fitnets": {"term.logits", "term.hidden_mse"},
    }[job]
    assert expected <= terms, terms
