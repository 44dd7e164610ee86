import pytest
import torch

from codistill.metrics import accuracy, churn, ensemble_accuracy, mean_pairwise_churn, mean_pairwise_kl, round_metrics
from codistill.models import MODELS, build_model


@pytest.mark.parametrize("name", list(MODELS))
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
    m = round_metrics([a, b], y)
    assert m["mean_peer_accuracy"] == 0.625 and m["churn"] == 0.5
