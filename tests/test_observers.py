"""Observers: equality with torch.ao observers, degenerate data, sites, histogram range selection, state."""

import copy
import warnings
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch

from src.quantization.observers import (
    HistogramObserver,
    MinMaxObserver,
    MovingAverageMinMaxObserver,
    PerChannelMinMaxObserver,
    build_observer,
)
from src.quantization.utils import (
    EPS,
    NonFiniteObservationError,
    QuantizationError,
    compute_qparams,
    fake_quantize,
    quant_range,
)

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from torch.ao.quantization import observer as tq


@dataclass
class QCfg:
    dtype: str = "quint8"
    scheme: str = "per_tensor"
    observer: str = "minmax"
    symmetric: bool = False
    bit_width: int = 8
    ch_axis: int = 0
    averaging_constant: float = 0.01
    histogram_bins: int = 2048
    histogram_method: str = "percentile"
    percentile: float = 99.99


def batches(n=5, shape=(4, 6, 5, 5), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) * (1 + i) + 0.3 * i for i in range(n)]


# (torch dtype, torch qscheme, ours qmin, qmax, symmetric, pass custom range to torch.ao)
TORCH_CASES = [
    (torch.quint8, torch.per_tensor_affine, 0, 255, False, True),
    (torch.qint8, torch.per_tensor_affine, -128, 127, False, True),
    (torch.qint8, torch.per_tensor_symmetric, -127, 127, True, True),
    (torch.qint8, torch.per_tensor_symmetric, -128, 127, True, True),
    # torch.ao uses (qmin+qmax)//2 for symmetric quint8 only with a customized range; the default gives 128 as ours
    (torch.quint8, torch.per_tensor_symmetric, 0, 255, True, False),
]


def _torch_obs(cls, dtype, qscheme, qmin, qmax, custom, **kw):
    rng = dict(quant_min=qmin, quant_max=qmax) if custom else {}
    return cls(dtype=dtype, qscheme=qscheme, **rng, **kw)


@pytest.mark.parametrize("dtype,qscheme,qmin,qmax,symmetric,custom", TORCH_CASES)
def test_minmax_and_moving_average_equal_torch_ao(dtype, qscheme, qmin, qmax, symmetric, custom):
    pairs = [
        (MinMaxObserver(qmin, qmax, symmetric), _torch_obs(tq.MinMaxObserver, dtype, qscheme, qmin, qmax, custom)),
        (MovingAverageMinMaxObserver(qmin, qmax, symmetric, averaging_constant=0.1),
         _torch_obs(tq.MovingAverageMinMaxObserver, dtype, qscheme, qmin, qmax, custom, averaging_constant=0.1)),
    ]
    for ours, ref in pairs:
        for x in batches():
            ours.collect(x)
            ref(x)
            assert torch.equal(ours.min_val[0], ref.min_val) and torch.equal(ours.max_val[0], ref.max_val)
        s, z = ours.compute()
        rs, rz = ref.calculate_qparams()
        assert torch.equal(s, rs.reshape(())) and int(z) == int(rz)


@pytest.mark.parametrize("ch_axis", [0, 1, 3])
def test_per_channel_equals_torch_ao(ch_axis):
    xs = batches(seed=ch_axis)
    c = xs[0].shape[ch_axis]
    ours = PerChannelMinMaxObserver(-127, 127, True, ch_axis=ch_axis, num_channels=c)
    ref = tq.PerChannelMinMaxObserver(ch_axis=ch_axis, dtype=torch.qint8, qscheme=torch.per_channel_symmetric,
                                      quant_min=-127, quant_max=127)
    for x in xs:
        ours.collect(x)
        ref(x)
    assert torch.equal(ours.min_val[0], ref.min_val) and torch.equal(ours.max_val[0], ref.max_val)
    s, z = ours.compute()
    rs, rz = ref.calculate_qparams()
    assert s.shape == (c,) and torch.equal(s, rs) and torch.equal(z.long(), rz.long())


def test_per_channel_asymmetric_equals_torch_ao():
    ours = PerChannelMinMaxObserver(0, 255, False, ch_axis=1, num_channels=6)
    ref = tq.PerChannelMinMaxObserver(ch_axis=1, dtype=torch.quint8, qscheme=torch.per_channel_affine,
                                      quant_min=0, quant_max=255)
    for x in batches():
        ours.collect(x)
        ref(x)
    s, z = ours.compute()
    rs, rz = ref.calculate_qparams()
    assert torch.equal(s, rs) and torch.equal(z.long(), rz.long())


def test_per_channel_wrong_channel_count_errors():
    obs = PerChannelMinMaxObserver(-127, 127, True, ch_axis=0, num_channels=3, name="model.2.cv1")
    with pytest.raises(QuantizationError, match="model.2.cv1.*3 channels"):
        obs.collect(torch.randn(4, 2))


@pytest.mark.parametrize("make", [
    lambda: MinMaxObserver(0, 255, False),
    lambda: MovingAverageMinMaxObserver(-128, 127, True),
    lambda: PerChannelMinMaxObserver(-7, 7, True, ch_axis=0, num_channels=2),
    lambda: HistogramObserver(0, 255, False, bins=64, method="percentile"),
    lambda: HistogramObserver(-127, 127, True, bins=64, method="entropy"),
    lambda: HistogramObserver(0, 255, False, bins=64, method="mse"),
])
@pytest.mark.parametrize("data", [
    torch.zeros(2, 3), torch.full((2, 3), 4.0), torch.full((2, 1), -1e-30), torch.full((2, 1), 1e30),
    torch.tensor([[3e38], [-3e38]]), torch.tensor([[1e-30], [-1e30]]),
])
def test_degenerate_observations_give_sane_qparams(make, data):
    obs = make()
    obs.collect(data)
    obs.collect(data)
    s, z = obs.compute()
    assert torch.isfinite(s).all() and (s >= EPS).all()
    assert ((z >= obs.qmin) & (z <= obs.qmax)).all()


def test_single_element_and_all_zero():
    obs = MinMaxObserver(0, 255, False)
    obs.collect(torch.tensor([0.0]))
    s, z = obs.compute()
    assert s.item() == EPS and z.item() == 0
    obs.collect(torch.tensor([2.55]))
    assert obs.compute()[0].item() == (torch.tensor(2.55) / 255).item()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("make", [
    lambda: MinMaxObserver(0, 255, False, name="model.4.m.0"),
    lambda: PerChannelMinMaxObserver(-127, 127, True, ch_axis=0, num_channels=2, name="model.4.m.0"),
    lambda: HistogramObserver(0, 255, False, name="model.4.m.0"),
])
def test_nonfinite_observation_raises_naming_layer(bad, make):
    obs = make()
    x = torch.randn(2, 8)
    x[1, 3] = bad
    with pytest.raises(NonFiniteObservationError, match="model.4.m.0") as err:
        obs.collect(x)
    assert err.value.layer_name == "model.4.m.0"
    assert not bool(obs.initialized.any())  # nothing half-updated


def test_uninitialized_compute_default():
    s, z = MinMaxObserver(0, 255, False).compute()
    assert s.item() == 1.0 and z.item() == 0 and s.dim() == 0
    s, z = PerChannelMinMaxObserver(-127, 127, True, ch_axis=0, num_channels=3).compute()
    assert torch.equal(s, torch.ones(3)) and torch.equal(z, torch.zeros(3, dtype=torch.int32))
    assert HistogramObserver(0, 255, True).compute()[1].item() == 128


def test_shared_sites_moving_average_covers_union():
    small, big = torch.linspace(0, 1, 50), torch.linspace(0, 10, 50)
    shared = MovingAverageMinMaxObserver(0, 255, False, averaging_constant=0.5, num_sites=2)
    single = MovingAverageMinMaxObserver(0, 255, False, averaging_constant=0.5)
    for _ in range(10):
        shared.collect(small, site=0)
        shared.collect(big, site=1)
        single.collect(small)
        single.collect(big)
    s, z = shared.compute()
    assert (255 - z.item()) * s.item() >= 10.0 - 1e-5  # [0, 10] representable
    assert torch.equal(s, compute_qparams(torch.tensor(0.0), torch.tensor(10.0), 0, 255, False)[0])
    # the same data through one site is averaged to a smaller max: that is what sites prevent
    assert single.max_val[0].item() < 9.0


def test_sites_reduce_only_initialized_and_check_range():
    obs = MinMaxObserver(-128, 127, False, num_sites=3)
    obs.collect(torch.tensor([-2.0, 1.0]), site=2)
    assert obs.compute_range()[0].item() == -2.0 and obs.compute_range()[1].item() == 1.0
    obs.collect(torch.tensor([0.5, 4.0]), site=0)
    lo, hi = obs.compute_range()
    assert lo.item() == -2.0 and hi.item() == 4.0
    with pytest.raises(QuantizationError, match="site=3"):
        obs.collect(torch.ones(2), site=3)


def test_eval_mode_forward_does_not_update_but_collect_does():
    obs = MinMaxObserver(0, 255, False).eval()
    x = torch.randn(10)
    assert obs(x) is x and not bool(obs.initialized[0])
    obs.collect(x)
    assert bool(obs.initialized[0])
    obs.train()(x * 10)
    assert obs.max_val[0].item() == (x * 10).max().item()


def test_collect_never_builds_graph():
    w = torch.randn(5, requires_grad=True)
    obs = MovingAverageMinMaxObserver(0, 255, False)
    obs.collect(w * 2)
    obs.collect(w * 3)
    assert not obs.min_val.requires_grad and obs.min_val.grad_fn is None


@pytest.mark.parametrize("make", [
    lambda: MovingAverageMinMaxObserver(0, 255, False, num_sites=2, averaging_constant=0.3),
    lambda: PerChannelMinMaxObserver(-127, 127, True, ch_axis=1, num_channels=6),
    lambda: HistogramObserver(0, 255, False, bins=128, method="entropy"),
    lambda: HistogramObserver(-127, 127, True, bins=128, method="mse"),
])
def test_state_dict_round_trip_exact(make):
    a, b = make(), make()
    xs = batches()
    for x in xs[:3]:
        a.collect(x)
    b.load_state_dict(copy.deepcopy(a.state_dict()))
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k
    for x in xs[3:]:
        a.collect(x)
        b.collect(x)
    sa, za = a.compute()
    sb, zb = b.compute()
    assert torch.equal(sa, sb) and torch.equal(za, zb)
    c = copy.deepcopy(a)
    assert torch.equal(c.compute()[0], sa)
    a.reset()
    assert not bool(a.initialized.any()) and a.compute()[0].flatten()[0].item() == 1.0


# ------------------------------------------------------------------------------------------------------ histogram
def _quant_mse(x, lo, hi, qmin, qmax, symmetric):
    s, z = compute_qparams(torch.tensor(lo), torch.tensor(hi), qmin, qmax, symmetric)
    return ((fake_quantize(x, s, z, qmin, qmax) - x) ** 2).mean().item()


def test_histogram_percentile_matches_empirical_quantiles():
    torch.manual_seed(0)
    x = torch.randn(200_000)
    sym = HistogramObserver(-128, 127, True, bins=2048, method="percentile", percentile=99.0)
    asym = HistogramObserver(0, 255, False, bins=2048, method="percentile", percentile=99.0)
    for chunk in x.split(50_000):
        sym.collect(chunk)
        asym.collect(chunk)
    width = (x.max() - x.min()).item() / 2048
    lo, hi = sym.compute_range()
    expected = torch.quantile(x.abs(), 0.99).item()  # ~2.576 for N(0, 1)
    assert abs(hi.item() - expected) < 2 * width and lo.item() == -hi.item()
    assert abs(expected - 2.5758) < 0.03
    lo, hi = asym.compute_range()
    assert abs(lo.item() - torch.quantile(x, 0.01).item()) < 2 * width
    assert abs(hi.item() - torch.quantile(x, 0.99).item()) < 2 * width


def test_histogram_rebins_when_range_grows_and_preserves_mass():
    obs = HistogramObserver(0, 255, False, bins=256, method="percentile", percentile=100.0)
    obs.collect(torch.rand(1000))          # [0, 1)
    obs.collect(torch.rand(3000) * 8 - 4)  # [-4, 4): range grows both ways
    assert obs.histogram.sum().item() == 4000
    assert obs.min_val.item() < -3.9 and obs.max_val.item() > 3.9
    lo, hi = obs.compute_range()
    assert lo.item() == pytest.approx(obs.min_val.item()) and hi.item() == pytest.approx(obs.max_val.item())
    # mass in [0, 1] after re-binning: 1000 from the first batch + ~375 from the second
    edges = torch.linspace(obs.min_val.item(), obs.max_val.item(), 257)
    in_unit = obs.histogram[(edges[:-1] >= -1e-6) & (edges[1:] <= 1 + 1e-2)].sum().item()
    assert 1250 < in_unit < 1500


def test_histogram_starting_from_zeros_then_growing():
    obs = HistogramObserver(0, 255, False, bins=16, method="percentile", percentile=100.0)
    obs.collect(torch.zeros(10))
    obs.collect(torch.tensor([1.0]))
    assert obs.histogram.sum().item() == 11 and obs.histogram[0].item() == 10


def _chosen_mse(x, obs_args, method):
    obs = HistogramObserver(*obs_args, bins=2048, method=method, percentile=99.9)
    obs.collect(x)
    lo, hi = obs.compute_range()
    return _quant_mse(x, lo.item(), hi.item(), *obs_args), (lo.item(), hi.item())


@pytest.mark.parametrize("args", [(-127, 127, True), (0, 255, False), (-8, 7, False)])
def test_histogram_mse_beats_minmax_and_other_methods_on_heavy_tailed_data(args):
    torch.manual_seed(1)
    x = torch.distributions.StudentT(3.0).sample((100_000,))
    minmax = _quant_mse(x, x.min().item(), x.max().item(), *args)
    mse, _ = _chosen_mse(x, args, "mse")
    assert mse < 0.9 * minmax
    for other in ("percentile", "entropy"):
        assert mse <= _chosen_mse(x, args, other)[0] * 1.001


@pytest.mark.parametrize("args", [(-127, 127, True), (0, 255, False), (-8, 7, False)])
def test_histogram_entropy_range_inside_min_max_and_clips_tails(args):
    torch.manual_seed(2)
    x = torch.distributions.Laplace(0.2, 1.0).sample((100_000,))
    err, (lo, hi) = _chosen_mse(x, args, "entropy")
    xmin, xmax = x.min().item(), x.max().item()
    if args[2]:  # symmetric: inside [-amax, amax]
        xmin, xmax = -max(-xmin, xmax), max(-xmin, xmax)
        assert lo == -hi
    assert xmin - 1e-4 <= lo < 0 < hi <= xmax + 1e-4
    assert lo > xmin + 0.1 or hi < xmax - 0.1  # the sparse tail is clipped
    assert err < _quant_mse(x, x.min().item(), x.max().item(), *args)


def test_kl_cut_keeps_dense_bulk_and_drops_sparse_outliers():
    hist = torch.zeros(2048, dtype=torch.float64)
    hist[:400] = torch.linspace(1000, 10, 400, dtype=torch.float64)  # dense decaying bulk
    hist[1900] = 1.0  # one far outlier
    cut = HistogramObserver._best_kl_cut(hist, 128)
    assert 300 <= cut <= 420
    assert HistogramObserver._best_kl_cut(hist, 4096) == 2048  # more levels than bins: no clipping


def test_histogram_sites_share_one_histogram():
    obs = HistogramObserver(0, 255, False, bins=64, num_sites=2)
    obs.collect(torch.rand(100), site=0)
    obs.collect(torch.rand(50) * 5, site=1)
    assert obs.histogram.sum().item() == 150 and obs.max_val.item() > 4


# -------------------------------------------------------------------------------------------------- build_observer
@pytest.mark.parametrize("observer,scheme,cls", [
    ("minmax", "per_tensor", MinMaxObserver),
    ("minmax", "per_channel", PerChannelMinMaxObserver),
    ("per_channel_minmax", "per_channel", PerChannelMinMaxObserver),
    ("moving_average_minmax", "per_tensor", MovingAverageMinMaxObserver),
    ("histogram", "per_tensor", HistogramObserver),
])
def test_build_observer_mapping(observer, scheme, cls):
    qmin, qmax = quant_range(8, True, narrow=True)
    obs = build_observer(QCfg(observer=observer, scheme=scheme, ch_axis=1, averaging_constant=0.3), qmin, qmax, True,
                         num_channels=6, num_sites=2, name="m")
    assert type(obs) is cls and obs.num_sites == 2 and obs.name == "m"
    if scheme == "per_channel":
        assert obs.ch_axis == 1 and obs.min_val.shape == (2, 6)
    if "moving" in observer:
        assert obs.averaging_constant == 0.3


def test_build_observer_serves_exactly_the_vocabulary():
    from src.quantization import vocabulary as vocab

    built = set()
    for observer in vocab.OBSERVERS:
        for scheme in vocab.SCHEMES:
            if vocab.observer_scheme_problem(observer, scheme) is None:
                built.add(build_observer(QCfg(observer=observer, scheme=scheme), -127, 127, True, num_channels=3).kind)
    assert built == set(vocab.OBSERVERS)


@pytest.mark.parametrize("cfg,match", [
    (QCfg(observer="histogram", scheme="per_channel"), "per-tensor only"),
    (QCfg(observer="per_channel_minmax", scheme="per_tensor"), "needs scheme 'per_channel'"),
    # the config's rule (src/quantization/vocabulary.py), not a second one: moving averages are per-tensor here
    (QCfg(observer="moving_average_minmax", scheme="per_channel"), "per-tensor only"),
    (QCfg(observer="minmaxx"), "unknown"),
    (QCfg(scheme="per_layer"), "per_tensor or per_channel"),
    (QCfg(observer="histogram", histogram_method="kl"), "histogram_method"),
    (QCfg(observer="moving_average_minmax", averaging_constant=0.0), "averaging_constant"),
    (QCfg(observer="minmax", scheme="per_channel"), "num_channels"),
])
def test_build_observer_errors(cfg, match):
    with pytest.raises(QuantizationError, match=match):
        build_observer(cfg, 0, 255, False, name="model.1")


# ------------------------------------------------------------------------------------------ calibration weighting
def test_calibration_weighs_every_batch_equally_then_qat_averages():
    """PTQ ranges are the mean of the calibration batches' extremes, not (mostly) the first batch's."""
    from src.quantization.calibration import calibrate
    from src.quantization.fake_quantize import FakeQuantize

    class Quantized(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))  # calibrate() finds the device from a parameter
            self.fq = FakeQuantize(QCfg(observer="moving_average_minmax", averaging_constant=0.01),
                                   SimpleNamespace(type="ste"), is_weight=False)

        def forward(self, x):
            return self.fq(x)

    model = Quantized()
    fq = model.fq
    peaks = [1.0, 2.0, 4.0, 8.0]  # batch k holds values in [-peak/4, peak]
    batches = [torch.linspace(-p / 4, p, 101).reshape(1, 1, 1, 101) for p in peaks]
    calibrate(model, batches, len(peaks), progress=False)
    lo, hi = fq.observer.compute_range()
    assert hi.item() == pytest.approx(sum(peaks) / 4, rel=1e-6) and lo.item() == pytest.approx(-sum(peaks) / 16, rel=1e-6)
    assert not fq.observer.calibrating
    # QAT afterwards: the moving average with c, from the calibrated state
    fq.train()
    fq.enable_observer(True)
    fq(torch.linspace(-1.0, 12.0, 101))
    assert fq.observer.max_val[0].item() == pytest.approx(3.75 + 0.01 * (12.0 - 3.75), rel=1e-6)
