import math

import pytest
import torch

from codistill.metrics import (
    accuracy,
    churn,
    ensemble_accuracy,
    eval_round_metrics,
    mean_pairwise_churn,
    mean_pairwise_kl,
)
from codistill.models import MODELS, build_model
from codistill.tasks import TASKS


@pytest.mark.parametrize("name", [n for n in MODELS if not n.startswith(("gpt", "hf"))])  # LMs: test_lm_models
def test_models_build_and_forward(name):
    shape = (3, 32, 32) if name not in ("mlp", "cnn") else (1, 8, 8)
    torch.manual_seed(0)
    m = build_model(name, shape, 7)
    out = m(torch.randn(2, *shape))
    assert out.shape == (2, 7)
    out.sum().backward()
    assert all(p.grad is not None for p in m.parameters() if p.requires_grad)


def test_resnet_depths_have_published_parameter_counts():
    # He et al. 2016 Table 6 (option-A shortcuts): 0.27M / 0.46M / 0.85M; option B adds a few thousand.
    counts = {d: sum(p.numel() for p in build_model(f"resnet{d}", (3, 32, 32), 10).parameters()) for d in (20, 32, 56)}
    assert 0.27e6 <= counts[20] <= 0.28e6 and 0.46e6 <= counts[32] <= 0.47e6 and 0.85e6 <= counts[56] <= 0.87e6
    wrn = sum(p.numel() for p in build_model("wrn16_4", (3, 32, 32), 10).parameters())
    assert 2.7e6 <= wrn <= 2.8e6  # WRN-16-4: 2.7M (Zagoruyko & Komodakis 2016, Table 1)


def test_torchvision_models_and_bad_names():
    m = build_model("torchvision:resnet18", (1, 28, 28), 10)
    assert m(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    with pytest.raises(ValueError, match="model: got 'resnet1000'.*resnet20"):
        build_model("resnet1000", (3, 32, 32), 10)
    with pytest.raises(ValueError, match="torchvision:"):
        build_model("torchvision:nope", (3, 32, 32), 10)


def test_metrics_by_hand():
    y = torch.tensor([0, 1, 2, 1])
    a = torch.tensor([[5.0, 0, 0], [0, 5, 0], [0, 5, 0], [5, 0, 0]])  # 2/4 right
    b = torch.tensor([[5.0, 0, 0], [0, 5, 0], [0, 0, 5], [0, 0, 5]])  # 3/4 right
    assert accuracy(a, y) == 0.5 and accuracy(b, y) == 0.75
    assert churn(a, b) == 0.5  # samples 2 and 3 differ
    assert mean_pairwise_churn([a, b, a]) == pytest.approx((0.5 + 0.0 + 0.5) / 3)
    # mean probabilities: samples 2 and 3 are ties between the peers' classes, resolved to the lower index
    # (1 on sample 2: wrong; 0 on sample 3: wrong); a third peer agreeing with b fixes sample 2
    assert ensemble_accuracy([a, b], y) == 0.5
    assert ensemble_accuracy([a, b, b], y) == 0.75
    assert mean_pairwise_kl([a, a]) == pytest.approx(0.0, abs=1e-7)
    p = torch.softmax(a, -1)
    q = torch.softmax(b, -1)
    kl_ab = (p * (p.log() - q.log())).sum(-1).mean()
    kl_ba = (q * (q.log() - p.log())).sum(-1).mean()
    assert mean_pairwise_kl([a, b]) == pytest.approx(((kl_ab + kl_ba) / 2).item(), rel=1e-5)
    m = eval_round_metrics([_streamed(a, y), _streamed(b, y)], 3, y)
    assert m["mean_peer_accuracy"] == 0.625 and m["churn"] == 0.5 and m["ensemble_accuracy"] == 0.5


def _streamed(logits, y, task="classification", batch=3):
    """What a peer sends the driver for these logits, evaluated batch by batch."""
    rows = list(zip(logits.split(batch), y.split(batch)))
    return TASKS[task].evaluate(lambda x: x, iter(rows), y.numel(), step=0)


@pytest.mark.parametrize("num_classes", [10, 100])
def test_streamed_metrics_equal_the_full_logit_ones(num_classes):
    """Peers send top-1 ids, the probability of the truth, top-10 probabilities and a KL subset; the round's
    numbers equal those computed from whole logit tensors (ensemble accuracy: exactly up to 10 classes)."""
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, num_classes, (200,), generator=g)
    peers = [torch.randn(200, num_classes, generator=g) * 3 for _ in range(3)]
    evals = [_streamed(p, y, batch=64) for p in peers]
    m = eval_round_metrics(evals, num_classes, y)
    assert m["churn"] == pytest.approx(mean_pairwise_churn(peers))
    assert m["mean_peer_accuracy"] == pytest.approx(sum(accuracy(p, y) for p in peers) / 3)
    assert m["mean_pairwise_kl"] == pytest.approx(mean_pairwise_kl(peers), rel=1e-5)  # subset = all 200 here
    probs = torch.stack([p.softmax(-1) for p in peers]).mean(0)
    assert m["ensemble_loss"] == pytest.approx(-probs.gather(1, y[:, None]).log().mean().item(), rel=1e-5)
    if num_classes <= 10:
        assert m["ensemble_accuracy"] == ensemble_accuracy(peers, y)
    else:  # top-10 of each peer: a lower bound on the others' mass, close on peaked predictions
        assert abs(m["ensemble_accuracy"] - ensemble_accuracy(peers, y)) <= 0.05
    assert all(e.nbytes <= 200 * (4 + 4 + 10 * 8) + 200 * num_classes * 4 for e in evals)  # never (N, C) logits twice


def test_language_model_evaluation_counts_tokens_and_ignores_padding():
    """Per token: loss in nats, next-token accuracy; padded target positions count nowhere, and the KL
    subset is the same positions for every peer."""
    from codistill.tasks import IGNORE_INDEX

    g = torch.Generator().manual_seed(1)
    logits = torch.randn(4, 6, 11, generator=g)  # (B, T, V)
    targets = torch.randint(0, 11, (4, 6), generator=g)
    padded = targets.clone()
    padded[:, 4:] = IGNORE_INDEX
    ev = TASKS["causal_lm"].evaluate(lambda x: x, iter([(logits, padded)]), padded.numel(), step=3)
    flat, t = logits[:, :4].reshape(-1, 11), targets[:, :4].reshape(-1)
    assert ev.count == 16
    assert ev.loss == pytest.approx(torch.nn.functional.cross_entropy(flat, t).item(), rel=1e-6)
    assert ev.accuracy == pytest.approx((flat.argmax(-1) == t).float().mean().item())
    assert ev.perplexity == pytest.approx(math.exp(ev.loss))
    assert ev.topk_ids is None and ev.subset_log_probs.shape == (16, 11)
