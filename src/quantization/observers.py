"""Observers: range statistics for quantizers, with the calibrator contract ``collect / reset / compute``.

State is fixed-shape buffers updated in place (no +-inf sentinels: an ``initialized`` flag per site says whether a
site has data), so state_dicts load strictly and deepcopies/EMA copies stay consistent.

Sites: one quantizer may be shared by several producer tensors whose values are later concatenated (they must share
one scale). Each site keeps its own statistics and ``compute()`` reduces over initialized sites (min of mins, max of
maxes), so e.g. a moving average covers the union of the sites' ranges instead of averaging them.

``collect`` always updates (calibrators call it explicitly); ``forward`` only updates in training mode. Whether an
observer runs at all inside QAT is decided by ``FakeQuantize`` (its ``observer_enabled`` switch and train/eval).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from src.quantization import vocabulary as vocab
from src.quantization.utils import QuantizationError, check_finite_stats, compute_qparams


class ObserverBase(nn.Module):
    """Common state and contract of all observers.

    Args:
        qmin: Smallest integer code of the target range.
        qmax: Largest integer code of the target range.
        symmetric: Produce symmetric qparams.
        ch_axis: Channel axis for per-channel statistics; None for per-tensor.
        num_channels: Size of ``ch_axis``; required for per-channel (state shape is fixed).
        num_sites: Number of producer tensors sharing this observer.
        name: Layer name used in error messages.
    """

    kind = "base"

    def __init__(self, qmin: int, qmax: int, symmetric: bool, ch_axis: int | None = None,
                 num_channels: int | None = None, num_sites: int = 1, name: str = ""):
        super().__init__()
        if qmin >= qmax:
            raise QuantizationError(f"{name or 'observer'}: qmin={qmin} must be < qmax={qmax}")
        if not isinstance(num_sites, int) or num_sites < 1:
            raise QuantizationError(f"{name or 'observer'}: num_sites={num_sites!r} must be an int >= 1")
        if ch_axis is not None and (not isinstance(num_channels, int) or num_channels < 1):
            raise QuantizationError(
                f"{name or 'observer'}: per-channel observation (ch_axis={ch_axis}) needs num_channels (an int >= 1), "
                f"got {num_channels!r}; pass the size of axis {ch_axis}"
            )
        self.qmin, self.qmax, self.symmetric = int(qmin), int(qmax), bool(symmetric)
        self.ch_axis, self.num_channels, self.num_sites, self.name = ch_axis, num_channels, num_sites, name
        # Under DDP each rank sees its own data shard and Ultralytics-style DDP does not broadcast buffers, so batch
        # statistics are all-reduced before they are folded in: every rank keeps identical ranges. Weight observers
        # turn this off (weights are already identical on every rank).
        self.sync_distributed = True
        # Set by the calibration loop while it runs (observers that average over batches weigh each one equally then)
        self.calibrating = False
        # Set by the trainer: non-finite statistics raise a flag on the device instead of an error here, and the
        # trainer reads all flags once per step with its own check of the loss (see nonfinite_observers)
        self.defer_finite_check = False
        self._init_state()
        self.register_buffer("nonfinite", torch.zeros((), dtype=torch.bool), persistent=False)
        # Python mirror of ``initialized``, so observing never reads a tensor back to the host
        self._has_data = [False] * self.num_sites

    def _init_state(self) -> None:
        shape = (self.num_sites,) if self.ch_axis is None else (self.num_sites, self.num_channels)
        self.register_buffer("min_val", torch.zeros(shape))
        self.register_buffer("max_val", torch.zeros(shape))
        self.register_buffer("initialized", torch.zeros(self.num_sites, dtype=torch.uint8))

    @property
    def per_channel(self) -> bool:
        return self.ch_axis is not None

    def _check_site(self, site: int) -> None:
        if not 0 <= site < self.num_sites:
            raise QuantizationError(
                f"{self.name or 'observer'}: site={site} out of range; it has {self.num_sites} sites")

    def _reduce(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Min and max of ``x``: 0-d per-tensor, ``[C]`` per-channel."""
        if self.ch_axis is None:
            return torch.aminmax(x)
        axis = self.ch_axis % x.dim()
        if x.shape[axis] != self.num_channels:
            raise QuantizationError(
                f"{self.name or 'observer'}: expected {self.num_channels} channels on axis {self.ch_axis}, "
                f"got shape {tuple(x.shape)}"
            )
        y = (x.transpose(0, axis) if axis else x).reshape(self.num_channels, -1)
        # amin/amax along dim 1 are vectorized; aminmax(dim=1) is ~20x slower on CPU. Same values.
        return y.amin(1), y.amax(1)

    def collect(self, x: torch.Tensor, site: int = 0) -> None:
        """Fold ``x`` (detached; never part of a graph) into the statistics of ``site``.

        Raises:
            NonFiniteObservationError: ``x`` holds NaN or inf (the message names this layer).
        """
        self._check_site(site)
        x = x.detach()  # statistics never join the autograd graph (buffers don't require grad either)
        if x.numel() == 0:
            return
        if x.dtype != torch.float32:
            x = x.float()
        cur_min, cur_max = self._reduce(x)
        if self._distributed():
            cur_min, cur_max = cur_min.clone(), cur_max.clone()
            torch.distributed.all_reduce(cur_min, torch.distributed.ReduceOp.MIN)
            torch.distributed.all_reduce(cur_max, torch.distributed.ReduceOp.MAX)
        if self.defer_finite_check:
            self.nonfinite |= ~(torch.isfinite(cur_min).all() & torch.isfinite(cur_max).all())
        else:
            check_finite_stats(cur_min, cur_max, self.name)
        self._update(x, site, cur_min, cur_max)

    def _distributed(self) -> bool:
        """True when statistics must be combined across DDP ranks."""
        return (self.sync_distributed and torch.distributed.is_available() and torch.distributed.is_initialized()
                and torch.distributed.get_world_size() > 1)

    def _sum_across_ranks(self, t: torch.Tensor) -> torch.Tensor:
        if self._distributed():
            torch.distributed.all_reduce(t, torch.distributed.ReduceOp.SUM)
        return t

    def _update(self, x: torch.Tensor, site: int, cur_min: torch.Tensor, cur_max: torch.Tensor) -> None:
        raise NotImplementedError

    def _first_observation(self, site: int, cur_min: torch.Tensor, cur_max: torch.Tensor) -> bool:
        """Take the first batch's min/max as the state of ``site``; False when the site already holds data."""
        if self._has_data[site]:
            return False
        self.min_val[site].copy_(cur_min)
        self.max_val[site].copy_(cur_max)
        self.initialized[site] = 1
        self._has_data[site] = True
        return True

    def reset(self) -> None:
        """Forget all statistics."""
        for buf in self.buffers(recurse=False):
            buf.zero_()
        self._has_data = [False] * self.num_sites

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._has_data = [bool(v) for v in self.initialized.tolist()]

    def copy_state_flags_from(self, other: "ObserverBase") -> None:
        """Take ``other``'s Python mirrors after its buffers were copied into this observer's (the EMA does)."""
        self._has_data = list(other._has_data)

    def compute_range(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The float range to quantize (reduced over initialized sites), or None without data."""
        sites = [i for i, seen in enumerate(self._has_data) if seen]
        if not sites:
            return None
        if len(sites) == 1:
            return self.min_val[sites[0]], self.max_val[sites[0]]
        if len(sites) == self.num_sites:
            return self.min_val.amin(0), self.max_val.amax(0)
        return self.min_val[sites].amin(0), self.max_val[sites].amax(0)

    def compute(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scale, zero_point)`` from the statistics via ``compute_qparams``.

        Without any data the scale is 1.0 (like torch's FakeQuantize initial state) and the zero point is the one
        of the range [0, 0].
        """
        rng = self.compute_range()
        if rng is None:
            shape = () if self.ch_axis is None else (self.num_channels,)
            zeros = torch.zeros(shape, device=self.min_val.device)
            _, zero_point = compute_qparams(zeros, zeros, self.qmin, self.qmax, self.symmetric)
            return torch.ones_like(zeros), zero_point
        return compute_qparams(rng[0], rng[1], self.qmin, self.qmax, self.symmetric)

    def forward(self, x: torch.Tensor, site: int = 0) -> torch.Tensor:
        """Collect ``x`` in training mode; return it unchanged."""
        if self.training:
            self.collect(x, site)
        return x

    def extra_repr(self) -> str:
        axis = "per-tensor" if self.ch_axis is None else f"per-channel(axis={self.ch_axis})"
        return f"qrange=[{self.qmin}, {self.qmax}], symmetric={self.symmetric}, {axis}, sites={self.num_sites}"


class MinMaxObserver(ObserverBase):
    """Running min and max over everything observed."""

    kind = "minmax"

    def _update(self, x, site, cur_min, cur_max):
        if self._first_observation(site, cur_min, cur_max):
            return
        min_val, max_val = self.min_val[site], self.max_val[site]
        torch.minimum(min_val, cur_min, out=min_val)
        torch.maximum(max_val, cur_max, out=max_val)


class MovingAverageMinMaxObserver(ObserverBase):
    """Exponential moving average of per-batch min and max (``m += c * (cur - m)``); the first batch initializes.

    While ``calibrating``, ``c`` is ``1 / k`` for the k-th batch: the plain mean of the batches' extremes.

    Args:
        averaging_constant: EMA momentum ``c`` in (0, 1].
        **kwargs: See ``ObserverBase``.
    """

    kind = "moving_average_minmax"

    def __init__(self, qmin: int, qmax: int, symmetric: bool, averaging_constant: float = 0.01, **kwargs):
        if not 0.0 < averaging_constant <= 1.0:
            raise QuantizationError(f"averaging_constant={averaging_constant} must be in (0, 1]; e.g. 0.01")
        super().__init__(qmin, qmax, symmetric, **kwargs)
        self.averaging_constant = float(averaging_constant)
        # batches folded in per site while calibrating; transient (calibration starts from reset()), not saved
        self.register_buffer("calibration_batches", torch.zeros(self.num_sites), persistent=False)

    def _update(self, x, site, cur_min, cur_max):
        if self.calibrating:
            self.calibration_batches[site] += 1
        if self._first_observation(site, cur_min, cur_max):
            return
        min_val, max_val = self.min_val[site], self.max_val[site]
        c = self.calibration_batches[site].reciprocal() if self.calibrating else self.averaging_constant
        # m + c * (cur - m), as torch.ao evaluates it, so results are bit-identical.
        min_val.add_((cur_min - min_val).mul_(c))
        max_val.add_((cur_max - max_val).mul_(c))

    def extra_repr(self) -> str:
        return super().extra_repr() + f", averaging_constant={self.averaging_constant}"


def _require_channels(name: str, ch_axis: int | None, kind: str) -> int:
    if ch_axis is None:
        raise QuantizationError(f"{name or 'observer'}: {kind} needs ch_axis (e.g. 0 for conv weights)")
    return ch_axis


class PerChannelMinMaxObserver(MinMaxObserver):
    """Running min and max per channel along ``ch_axis`` (any axis)."""

    kind = "per_channel_minmax"

    def __init__(self, qmin: int, qmax: int, symmetric: bool, ch_axis: int = 0, **kwargs):
        super().__init__(qmin, qmax, symmetric, ch_axis=_require_channels(kwargs.get("name", ""), ch_axis, self.kind),
                         **kwargs)


class HistogramObserver(ObserverBase):
    """Per-tensor histogram whose clipping range is chosen by percentile, MSE or entropy (KL divergence).

    State: ``histogram`` (``bins`` float64 counts) over ``[min_val, max_val]`` (the observed extremes, widened to
    include 0). A batch outside the range widens it to the union and re-bins the old counts, assuming counts are
    uniform within a bin (mass is preserved exactly). All sites feed the same histogram: the union of their values
    is exactly the distribution of their concatenation.

    Methods (``compute_range``):
      * ``percentile``: symmetric: the ``percentile``-th percentile of ``|x|``; asymmetric: the ``100 - p`` and
        ``p`` percentiles.
      * ``mse``: the candidate range minimizing the expected squared quantization error, integrated exactly per bin
        (values uniform within a bin; rounding and clipping error both counted). Candidates: symmetric 128
        thresholds ``amax * k/128``; asymmetric a coordinate search (both ends, lower, upper) on the same grid.
      * ``entropy``: TensorRT-style: the threshold minimizing KL(P || Q) between the clipped reference histogram and
        its quantized version. Symmetric: on the ``|x|`` histogram with half the levels. Asymmetric: each side of 0
        is cut independently, with the share of levels that side has in the unclipped range. With fewer bins than
        levels (e.g. 16 bits) nothing is clipped.

    ``compute()`` costs a few milliseconds (entropy/mse); histograms are meant for calibration.

    Args:
        bins: Number of histogram bins.
        method: One of ``percentile``, ``mse``, ``entropy``.
        percentile: Percentile (in percent, e.g. 99.99) for ``method="percentile"``.
        **kwargs: See ``ObserverBase`` (per-tensor only).
    """

    kind = "histogram"

    def __init__(self, qmin: int, qmax: int, symmetric: bool, bins: int = 2048, method: str = "percentile",
                 percentile: float = 99.99, **kwargs):
        name = kwargs.get("name", "")
        if kwargs.get("ch_axis") is not None:
            raise QuantizationError(f"{name or 'observer'}: the histogram observer is per-tensor only; "
                                    "use scheme: per_tensor or observer: per_channel_minmax")
        if method not in vocab.HISTOGRAM_METHODS:
            raise QuantizationError(f"{name or 'observer'}: histogram_method={method!r} is unknown; "
                                    f"use one of {', '.join(vocab.HISTOGRAM_METHODS)}")
        if not isinstance(bins, int) or bins < 2:
            raise QuantizationError(f"{name or 'observer'}: histogram_bins={bins!r} must be an int >= 2, e.g. 2048")
        if not 0.0 < percentile <= 100.0:
            raise QuantizationError(f"{name or 'observer'}: percentile={percentile} must be in (0, 100], e.g. 99.99")
        self.bins, self.method, self.percentile = bins, method, float(percentile)
        super().__init__(qmin, qmax, symmetric, **kwargs)

    def _init_state(self) -> None:
        self.register_buffer("histogram", torch.zeros(self.bins, dtype=torch.float64))
        self.register_buffer("min_val", torch.zeros(1))
        self.register_buffer("max_val", torch.zeros(1))
        self.register_buffer("initialized", torch.zeros(1, dtype=torch.uint8))

    # -- statistics ------------------------------------------------------------------------------------------------
    def _update(self, x, site, cur_min, cur_max):
        lo, hi = min(float(cur_min), 0.0), max(float(cur_max), 0.0)
        if not bool(self.initialized[0]):
            self.min_val.fill_(lo)
            self.max_val.fill_(hi)
            self.initialized.fill_(1)
            self._has_data[0] = True
        elif lo < float(self.min_val) or hi > float(self.max_val):
            self._rebin(min(lo, float(self.min_val)), max(hi, float(self.max_val)))
        lo, hi = float(self.min_val), float(self.max_val)
        if hi > lo:
            self.histogram.add_(self._sum_across_ranks(torch.histc(x, self.bins, lo, hi).double()))
        else:  # all values so far are 0: a point mass, kept in bin 0
            # on the histogram's device: NCCL all-reduces device tensors only
            self.histogram[0] += self._sum_across_ranks(torch.tensor(float(x.numel()), dtype=torch.float64,
                                                                     device=self.histogram.device))

    def _cdf(self, t: torch.Tensor) -> torch.Tensor:
        """Mass below ``t`` (float64), counts spread uniformly within each bin."""
        lo, hi = float(self.min_val), float(self.max_val)
        hist = self.histogram
        if hi <= lo:
            return torch.where(t > lo, hist.sum(), torch.zeros_like(t))
        pos = ((t - lo) / (hi - lo) * self.bins).clamp(0, self.bins)
        idx = pos.floor().clamp(max=self.bins - 1)
        cum = torch.cat([hist.new_zeros(1), hist.cumsum(0)])
        i = idx.long()
        return cum[i] + (pos - idx) * hist[i]

    def _rebin(self, new_lo: float, new_hi: float) -> None:
        edges = torch.linspace(new_lo, new_hi, self.bins + 1, dtype=torch.float64, device=self.histogram.device)
        old_lo = float(self.min_val)
        if float(self.max_val) <= old_lo:  # point mass at old_lo
            total = self.histogram.sum()
            idx = min(int((old_lo - new_lo) / (new_hi - new_lo) * self.bins), self.bins - 1)
            self.histogram.zero_()[idx] = total
        else:
            cdf = self._cdf(edges)
            cdf[-1] = self.histogram.sum()
            self.histogram.copy_(cdf.diff())
        self.min_val.fill_(new_lo)
        self.max_val.fill_(new_hi)

    # -- range selection -------------------------------------------------------------------------------------------
    def _edges(self) -> torch.Tensor:
        return torch.linspace(float(self.min_val), float(self.max_val), self.bins + 1, dtype=torch.float64,
                              device=self.histogram.device)

    def _folded(self) -> tuple[torch.Tensor, float]:
        """Histogram of ``|x|`` over ``[0, amax]`` with the same number of bins."""
        amax = max(-float(self.min_val), float(self.max_val))
        t = torch.linspace(0.0, amax, self.bins + 1, dtype=torch.float64, device=self.histogram.device)
        g = self._cdf(t) - self._cdf(-t)
        g[-1] = self.histogram.sum()
        return g.diff().clamp(min=0), amax

    @staticmethod
    def _quantile(hist: torch.Tensor, lo: float, hi: float, mass: float) -> float:
        """Exact inverse of the piecewise-linear CDF of ``hist`` over ``[lo, hi]``."""
        cum = hist.cumsum(0)
        idx = int(torch.searchsorted(cum, torch.tensor([mass], dtype=cum.dtype, device=cum.device)).clamp(
            max=len(hist) - 1))
        prev = float(cum[idx - 1]) if idx > 0 else 0.0
        count = float(hist[idx])
        frac = min(max((mass - prev) / count, 0.0), 1.0) if count > 0 else 0.0
        return lo + (idx + frac) * (hi - lo) / len(hist)

    def _percentile_range(self) -> tuple[float, float]:
        p = self.percentile / 100.0
        if self.symmetric:
            folded, amax = self._folded()
            t = self._quantile(folded, 0.0, amax, p * float(folded.sum()))
            return -t, t
        lo, hi = float(self.min_val), float(self.max_val)
        total = float(self.histogram.sum())
        return (self._quantile(self.histogram, lo, hi, (1.0 - p) * total),
                self._quantile(self.histogram, lo, hi, p * total))

    @staticmethod
    def _expected_sq_error(lo: torch.Tensor, hi: torch.Tensor, s: torch.Tensor, a: torch.Tensor,
                           b: torch.Tensor) -> torch.Tensor:
        """Integral of the squared quantization error over ``[lo, hi]`` for step ``s`` and code range ``[a, b]``.

        Grid points are multiples of ``s`` (integer zero point). Inside ``[a - s/2, b + s/2]`` the error is the
        rounding sawtooth, whose integral from the start of the period around ``k*s`` up to ``x`` is
        ``(r^3 + s^3/8) / 3`` with ``r = x - k*s``; full periods add ``s^3 / 12``. Outside, values clip to a or b.
        """
        lo_in, hi_in = a - s / 2, b + s / 2

        def saw(x):
            k = torch.round(x / s)
            r = x - k * s
            return k * s**3 / 12 + (r**3 + s**3 / 8) / 3

        below_hi = torch.minimum(hi, lo_in)
        below = torch.where(lo < lo_in, ((below_hi - a) ** 3 - (lo - a) ** 3) / 3, 0.0)
        mid_lo, mid_hi = torch.maximum(lo, lo_in), torch.minimum(hi, hi_in)
        mid = torch.where(mid_hi > mid_lo, saw(mid_hi) - saw(mid_lo), 0.0)
        above_lo = torch.maximum(lo, hi_in)
        above = torch.where(hi > hi_in, ((hi - b) ** 3 - (above_lo - b) ** 3) / 3, 0.0)
        return below + mid + above

    def _mse_of(self, cand_lo: torch.Tensor, cand_hi: torch.Tensor) -> torch.Tensor:
        """Expected squared error (summed over the histogram) of each candidate range."""
        edges = self._edges()
        width = (float(self.max_val) - float(self.min_val)) / self.bins
        scale, zp = compute_qparams(cand_lo.float(), cand_hi.float(), self.qmin, self.qmax, self.symmetric)
        s, zp = scale.double()[:, None], zp.double()[:, None]
        a, b = (self.qmin - zp) * s, (self.qmax - zp) * s
        used = self.histogram > 0  # empty bins contribute nothing
        err = self._expected_sq_error(edges[:-1][used][None, :], edges[1:][used][None, :], s, a, b) / width
        return err @ self.histogram[used]

    def _mse_range(self) -> tuple[float, float]:
        lo, hi = float(self.min_val), float(self.max_val)
        dev = self.histogram.device
        f = torch.arange(1, 129, dtype=torch.float64, device=dev) / 128
        if self.symmetric:
            amax = max(-lo, hi)
            k = int(self._mse_of(-amax * f, amax * f).argmin())
            return -amax * float(f[k]), amax * float(f[k])
        # Coordinate search: shrink both ends together, then the lower end alone, then the upper end alone.
        k = int(self._mse_of(lo * f, hi * f).argmin())
        best_lo, best_hi = lo * float(f[k]), hi * float(f[k])
        g = torch.cat([torch.zeros(1, dtype=torch.float64, device=dev), f])
        k = int(self._mse_of(lo * g, torch.full_like(g, best_hi)).argmin())
        best_lo = lo * float(g[k])
        k = int(self._mse_of(torch.full_like(f, best_lo), hi * f).argmin())
        return best_lo, hi * float(f[k])

    @classmethod
    def _best_kl_cut(cls, hist: torch.Tensor, nq: int) -> int:
        """Coarse-to-fine search (at most ~256 + 2 * stride candidates) of ``_kl_cut_in``."""
        n_bins = len(hist)
        if n_bins <= nq or float(hist.sum()) <= 0:
            return n_bins
        stride = max(1, (n_bins - nq) // 256)
        best = cls._kl_cut_in(hist, nq, torch.arange(nq, n_bins + 1, stride, device=hist.device))
        if stride > 1:
            lo, hi = max(nq, best - stride + 1), min(n_bins, best + stride - 1)
            best = cls._kl_cut_in(hist, nq, torch.arange(lo, hi + 1, device=hist.device))
        return best

    @staticmethod
    def _kl_cut_in(hist: torch.Tensor, nq: int, cand: torch.Tensor) -> int:
        """The candidate number of leading bins ``i`` to keep (later ones merged into bin ``i-1``) minimizing KL(P||Q).

        P is the clipped histogram, Q its quantization to ``nq`` levels: bins split into ``nq`` contiguous chunks,
        each chunk's mass spread evenly over its non-empty bins. Chunk sums come from cumulative sums, so each
        candidate is scored in O(nq) without materializing Q.
        """
        total = float(hist.sum())
        dev, f64 = hist.device, torch.float64
        zero = hist.new_zeros(1)
        csum = torch.cat([zero, hist.cumsum(0)])
        cnz = torch.cat([zero, (hist > 0).to(f64).cumsum(0)])
        xlogx = lambda t: torch.where(t > 0, t * torch.log(torch.where(t > 0, t, 1.0)), 0.0)  # noqa: E731
        cxlogx = torch.cat([zero, xlogx(hist).cumsum(0)])
        k = torch.arange(nq + 1, device=dev)
        bounds = (k[None, :] * cand[:, None] + nq - 1) // nq  # chunk c covers [bounds[c], bounds[c+1])
        chunk = csum[bounds[:, 1:]] - csum[bounds[:, :-1]]
        nonzero = cnz[bounds[:, 1:]] - cnz[bounds[:, :-1]]
        outliers = total - csum[cand]
        last = hist[cand - 1]
        p_log_p = (cxlogx[cand - 1] + xlogx(last + outliers)) / total - math.log(total)
        mass = chunk.clone()
        mass[:, -1] += outliers
        q = chunk / (nonzero.clamp(min=1) * csum[cand][:, None])
        has = nonzero > 0
        cross = torch.where(has, mass / total * torch.log(torch.where(has, q, 1.0)), 0.0).sum(1)
        kl = p_log_p - cross
        kl = torch.where((last == 0) & (outliers > 0), math.inf, kl)  # P has mass where Q has none
        return int(cand[int(kl.argmin())])

    def _side(self, positive: bool) -> tuple[torch.Tensor, float]:
        """Histogram of ``|x|`` for the values on one side of 0, over ``[0, extent]``."""
        extent = float(self.max_val) if positive else -float(self.min_val)
        t = torch.linspace(0.0, extent, self.bins + 1, dtype=torch.float64, device=self.histogram.device)
        hist = self._cdf(t).diff() if positive else -self._cdf(-t).diff()
        return hist.clamp(min=0), extent

    def _entropy_range(self) -> tuple[float, float]:
        if self.symmetric:
            folded, amax = self._folded()
            i = self._best_kl_cut(folded, max(1, (self.qmax - self.qmin + 1) // 2))
            t = amax * i / self.bins
            return -t, t
        # Each side of 0 is cut independently with its share of the levels; the shares follow the cut range, so
        # iterate a few times from the unclipped split.
        lo0, hi0 = float(self.min_val), float(self.max_val)
        nq = self.qmax - self.qmin + 1
        sides = {True: self._side(True), False: self._side(False)}
        lo, hi = lo0, hi0
        for _ in range(3):
            n_pos = min(max(1, round(nq * hi / (hi - lo))), nq - 1) if lo < 0 < hi else nq
            new_lo, new_hi = lo, hi
            if hi0 > 0:
                h, ext = sides[True]
                new_hi = ext * self._best_kl_cut(h, n_pos) / self.bins
            if lo0 < 0:
                h, ext = sides[False]
                new_lo = -ext * self._best_kl_cut(h, nq - n_pos if hi0 > 0 else nq) / self.bins
            if (new_lo, new_hi) == (lo, hi):
                break
            lo, hi = new_lo, new_hi
        return lo, hi

    def compute_range(self):
        if not bool(self.initialized[0]):
            return None
        if float(self.max_val) <= float(self.min_val) or float(self.histogram.sum()) <= 0:
            return self.min_val[0], self.max_val[0]
        lo, hi = {"percentile": self._percentile_range, "mse": self._mse_range,
                  "entropy": self._entropy_range}[self.method]()
        return (torch.tensor(lo, dtype=torch.float32, device=self.min_val.device),
                torch.tensor(hi, dtype=torch.float32, device=self.min_val.device))

    def extra_repr(self) -> str:
        extra = f", percentile={self.percentile}" if self.method == "percentile" else ""
        return super().extra_repr() + f", bins={self.bins}, method={self.method}{extra}"


def nonfinite_observers(observers: list[ObserverBase]) -> torch.Tensor:
    """Whether any of ``observers`` flagged non-finite statistics since its flag was cleared (on the device)."""
    return torch.stack([o.nonfinite for o in observers]).any()


def take_nonfinite_names(observers: list[ObserverBase]) -> list[str]:
    """Names of the observers that flagged non-finite statistics, clearing their flags (reads each: failure path)."""
    names = [o.name or "observer" for o in observers if bool(o.nonfinite)]
    for o in observers:
        o.nonfinite.zero_()
    return names


def build_observer(qcfg, qmin: int, qmax: int, symmetric: bool, num_channels: int | None = None,
                   num_sites: int = 1, name: str = "") -> ObserverBase:
    """Build the observer a quantizer config asks for.

    Mapping of (``qcfg.observer``, ``qcfg.scheme``) to classes:

    ===========================  ==============================  =========================================
    observer                     per_tensor                      per_channel (axis ``qcfg.ch_axis``)
    ===========================  ==============================  =========================================
    ``minmax``                   MinMaxObserver                  PerChannelMinMaxObserver
    ``per_channel_minmax``       error                           PerChannelMinMaxObserver
    ``moving_average_minmax``    MovingAverageMinMaxObserver     error
    ``histogram``                HistogramObserver               error
    ===========================  ==============================  =========================================

    Args:
        qcfg: A QuantizerConfig-like object (``observer``, ``scheme``, ``ch_axis``, ``averaging_constant``,
            ``histogram_bins``, ``histogram_method``, ``percentile``).
        qmin: Smallest integer code.
        qmax: Largest integer code.
        symmetric: Symmetric qparams.
        num_channels: Channels along ``ch_axis``; required for per_channel.
        num_sites: Producer tensors sharing the observer.
        name: Layer name for error messages.
    """
    kind, scheme = qcfg.observer, qcfg.scheme
    where = name or "quantizer"
    if scheme not in vocab.SCHEMES:
        raise QuantizationError(f"{where}: scheme={scheme!r} is unknown; use {' or '.join(vocab.SCHEMES)}")
    if kind not in vocab.OBSERVERS:
        raise QuantizationError(f"{where}: observer={kind!r} is unknown; use one of {', '.join(vocab.OBSERVERS)}")
    problem = vocab.observer_scheme_problem(kind, scheme)
    if problem:
        raise QuantizationError(f"{where}: observer {problem}")
    common = dict(num_sites=num_sites, name=name)
    per_channel = scheme == "per_channel"
    if per_channel:
        common.update(ch_axis=getattr(qcfg, "ch_axis", 0), num_channels=num_channels)
    if kind == "histogram":
        return HistogramObserver(qmin, qmax, symmetric, bins=getattr(qcfg, "histogram_bins", 2048),
                                 method=getattr(qcfg, "histogram_method", "percentile"),
                                 percentile=getattr(qcfg, "percentile", 99.99), **common)
    if kind == "moving_average_minmax":
        return MovingAverageMinMaxObserver(qmin, qmax, symmetric,
                                           averaging_constant=getattr(qcfg, "averaging_constant", 0.01), **common)
    return (PerChannelMinMaxObserver if per_channel else MinMaxObserver)(qmin, qmax, symmetric, **common)
