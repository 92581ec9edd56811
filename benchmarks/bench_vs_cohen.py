"""End-to-end certification: soapbubble against Cohen et al.'s PyTorch ``Smooth.certify``.

Both sides certify the same images with the same weights, Gaussian noise, ``n0``,
``N`` and ``alpha = 0.001``, in one process, each at its own best batch size;
runs alternate between the two so a busy machine slows both alike; times are
medians.

* soapbubble: :func:`soapbubble.certify` (``batched=True`` over the
  images), the model from :func:`soapbubble.models.load`, radius table built
  beforehand (closed form, not timed); the batch size is the fastest of a few,
  chosen by a timed pass, as for the baseline.
* PyTorch: :class:`cohen_reference.Smooth` (their algorithm and host loop),
  eval mode, ``torch.no_grad``, ``torch.set_num_threads(2)`` (XLA's CPU client
  also runs two threads here). Two variants: *as published* (their per-prediction
  Python counting loop, batch 1000) and *best*: the fastest of their loop or
  ``np.bincount`` over a few batch sizes, chosen by a timed pass. The headline
  ratio is against the best variant.

Models and weights:

* default model: soapbubble's ``small_cnn`` trained on the embedded 8x8 digits
  (``soapbubble.main_job.default_model``, trained once and cached); its flax
  weights are copied into an equivalent PyTorch module
  (``cohen_reference.small_cnn_from_flax``). sigma = 0.25.
* CIFAR ResNet-20 / ResNet-110: Cohen et al.'s PyTorch layout with their random
  init and random BatchNorm statistics, saved as their checkpoint
  (``{"arch", "state_dict"}`` of ``Sequential(NormalizeLayer, model)``),
  converted with ``soapbubble.models.convert.convert_checkpoint`` and loaded
  with ``soapbubble.models.load``; random 32x32x3 images (no CIFAR download).
  For these the time is split into the forward pass (bare jitted flax forward and
  PyTorch forward, timed on the same noisy batches of the shapes certify runs)
  and everything around it. The flax ResNets run as ``models.load`` builds them:
  in eval mode each BatchNorm is folded into the convolution before it (their
  default, ``fold_batchnorm=True``; see ``docs/guides/cpu_performance.md``).
  ``--resnet-n N`` certifies one image per ResNet at ``N`` samples instead of
  the default 1,000 (ResNet-20) and 200 (ResNet-110); issue 16's goal is stated
  at ``--resnet-n 10000``.

The max |logit difference| between the two models on a noisy batch is reported
as the check that the weights are identical.

``--gpu`` runs the GPU case instead (ResNet-110, N = 100,000, batch 400, on
jax's default GPU and torch's CUDA device): seconds per image for both, and the
bare forward throughput of both as the limit.

Usage:
  python benchmarks/bench_vs_cohen.py [--write] [--quick] [--resnet-n N]
  python benchmarks/bench_vs_cohen.py --gpu [--write]
"""

from __future__ import annotations

import os
import sys

if "--gpu" in sys.argv:  # jax must not grab most of the GPU memory torch also needs
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import argparse
import pathlib
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import cohen_reference as ref
from _common import command_line, cpu_snapshot, machine, others_share, sharing_sentence, write_section

from soapbubble import main_job, models, noise
from soapbubble import cached_radius_table, certify
from soapbubble.counting import CHUNK
from soapbubble.models import convert

SIGMA = 0.25
ALPHA = 0.001
N0 = 100


def _now() -> float:
    return time.perf_counter()


def _timed(fn):
    t0 = _now()
    out = fn()
    return out, _now() - t0


def _to_torch(images_nhwc: np.ndarray, device) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(images_nhwc.transpose(0, 3, 1, 2))).to(device)


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class _TimedForward(torch.nn.Module):
    """Wraps the baseline's model and adds up the seconds spent in its forward passes."""

    def __init__(self, model: torch.nn.Module, device):
        super().__init__()
        self.model, self.device, self.seconds = model, device, 0.0

    def forward(self, x):
        _sync(self.device)
        t0 = _now()
        out = self.model(x)
        _sync(self.device)
        self.seconds += _now() - t0
        return out


class Case:
    """One model certified by both sides on the same images."""

    def __init__(self, name, logits_fn, torch_model, images, n, batch, device):
        self.name, self.logits_fn = name, logits_fn
        self.torch_model = _TimedForward(torch_model.eval().to(device), device)
        self.images, self.n, self.batch, self.device = images, n, batch, device
        self.family = noise.Gaussian(SIGMA)
        d = int(np.prod(images.shape[1:]))
        self.table = cached_radius_table(self.family, d, "l2", table_dir=tempfile.mkdtemp())
        self.x_torch = _to_torch(images, device)
        with torch.no_grad():
            self.num_classes = int(self.torch_model(self.x_torch[:1]).shape[1])

    def run_soapbubble(self, batch=None, images: int | None = None):
        cert = certify(jax.random.key(0), self.logits_fn, self.images[: images or len(self.images)],
                       self.family, n0=N0, n=self.n, alpha=ALPHA, batch_size=batch or self.batch,
                       table=self.table, batched=True)
        return cert  # numpy fields: certify has finished

    def run_torch(self, count: str, batch: int, images: int | None = None):
        smooth = ref.Smooth(self.torch_model, self.num_classes, SIGMA, count=count)
        rows = self.x_torch[: images or len(self.x_torch)]
        return [smooth.certify(x, N0, self.n, ALPHA, batch) for x in rows]

    def logit_gap(self) -> tuple[float, float]:
        """(max |logits_flax - logits_torch|, max |logits_torch|) on 64 noisy copies of each image."""
        rng = np.random.default_rng(0)
        noisy = (self.images[:, None] + SIGMA * rng.standard_normal((len(self.images), 64, *self.images.shape[1:]))
                 ).astype(np.float32).reshape(-1, *self.images.shape[1:])
        flax_logits = np.asarray(self.logits_fn(jnp.asarray(noisy)))
        with torch.no_grad():
            torch_logits = self.torch_model(_to_torch(noisy, self.device)).cpu().numpy()
        return float(np.max(np.abs(flax_logits - torch_logits))), float(np.max(np.abs(torch_logits)))


def _shapes(n: int, batch: int) -> list[tuple[int, int]]:
    """(rows, calls) of the forward passes soapbubble's certify makes per input (n0 pass, n pass)."""
    out = []
    for num in (N0, n):  # whole chunks, never more than the samples need (soapbubble.counting)
        rows = min(max(1, batch // CHUNK), -(-num // CHUNK)) * CHUNK
        out.append((rows, -(-num // rows)))
    return out


def soapbubble_forward(case: Case):
    """A function timing the bare jitted forward passes of one input's certification (seconds)."""
    rng = np.random.default_rng(1)
    batches = []
    for rows, calls in _shapes(case.n, case.batch):
        noisy = case.images[0] + SIGMA * rng.standard_normal((rows, *case.images.shape[1:]))
        batches.append((jax.device_put(noisy.astype(np.float32)), calls))
    for x, _ in batches:
        case.logits_fn(x).block_until_ready()  # compile

    def run() -> float:
        t0 = _now()
        for x, calls in batches:
            for _ in range(calls):
                case.logits_fn(x).block_until_ready()
        return _now() - t0

    return run


def pick_soapbubble_batch(case: Case, batches, images: int, passes: int) -> tuple[int, dict]:
    """The fastest certify batch size on the first ``images`` images (fastest of ``passes``, after compiling)."""
    for b in batches:
        case.run_soapbubble(b, images)  # compile this batch shape
    seconds = {}
    for b in batches:
        seconds[b] = min(_timed(lambda b=b: case.run_soapbubble(b, images))[1] for _ in range(passes))
    return min(seconds, key=seconds.get), seconds


def pick_torch_variant(case: Case, counts, batches, images: int, passes: int) -> tuple[str, int, dict]:
    """The fastest (count, batch) of the baseline on the first ``images`` images (fastest of ``passes``)."""
    for b in batches:  # warm up oneDNN at every batch shape
        case.run_torch("bincount", b, 1)
    seconds = {}
    for count in counts:
        for b in batches:
            run = lambda count=count, b=b: case.run_torch(count, b, images)
            seconds[(count, b)] = min(_timed(run)[1] for _ in range(passes))
    best = min(seconds, key=seconds.get)
    return best[0], best[1], seconds


def compare(case: Case, repeats: int, counts, batches, sb_batches, probe_images: int,
            probe_passes: int = 2) -> dict:
    """Alternating timed runs: soapbubble certify, its bare forward passes, the published and the best baseline.

    Seconds per image are medians over the runs (``*_min``: the fastest run, the
    least disturbed by other work on a shared machine). The forward share of
    the baseline is measured inside its runs (its model is wrapped in a timer);
    soapbubble's forward passes are fused into its compiled loop, so they are
    timed as bare jitted calls on the same shapes, right after each certify run.
    """
    busy0 = cpu_snapshot()
    _, cold = _timed(lambda: case.run_soapbubble(images=1))  # compiles the counting loops
    case.batch, sb_probe = pick_soapbubble_batch(case, sb_batches, probe_images, probe_passes)
    forward = soapbubble_forward(case)
    count, best_batch, probe = pick_torch_variant(case, counts, batches, probe_images, probe_passes)
    published = ("loop", min(1000, case.n))
    k = len(case.images)
    t = {name: [] for name in ("sb", "fwd_sb", "published", "best", "fwd_best")}
    for _ in range(repeats):
        cert, sec = _timed(case.run_soapbubble)
        t["sb"].append(sec / k)
        t["fwd_sb"].append(forward())
        case.torch_model.seconds = 0.0
        torch_out, sec = _timed(lambda: case.run_torch(*published))
        t["published"].append(sec / k)
        if (count, best_batch) != published:
            case.torch_model.seconds = 0.0
            torch_out, sec = _timed(lambda: case.run_torch(count, best_batch))
        t["best"].append(sec / k)
        t["fwd_best"].append(case.torch_model.seconds / k)
    torch_pred = np.array([p for p, _ in torch_out])
    torch_radius = np.array([r for _, r in torch_out])
    out = {name: statistics.median(v) for name, v in t.items()}
    out.update(
        sb_min=min(t["sb"]),
        best_min=min(t["best"]),
        # Per-run ratios, then the median: each pair saw the same disturbance.
        over_sb=statistics.median(a / b for a, b in zip(t["sb"], t["fwd_sb"])),
        over_best=statistics.median(a / b for a, b in zip(t["best"], t["fwd_best"])),
        images=k,
        cold=cold,
        best_variant=(count, best_batch),
        probe=probe,
        sb_probe=sb_probe,
        agree=int(np.sum(np.asarray(cert.prediction) == torch_pred)),
        radius_gap=float(np.max(np.abs(np.asarray(cert.radius) - torch_radius))),
        sb_radius_mean=float(np.mean(cert.radius)),
        logit_gap=case.logit_gap(),
        others=others_share(busy0, cpu_snapshot()),
    )
    return out


def forward_seconds(case: Case, rows: int, repeats: int) -> tuple[float, float]:
    """Fastest seconds of one bare forward pass of ``rows`` noisy inputs: (flax jitted, torch)."""
    rng = np.random.default_rng(1)
    noisy = (case.images[0] + SIGMA * rng.standard_normal((rows, *case.images.shape[1:]))).astype(np.float32)
    xj = jax.device_put(noisy)
    xt = _to_torch(noisy, case.device)
    case.logits_fn(xj).block_until_ready()  # compile
    model = case.torch_model.model
    with torch.no_grad():
        model(xt)
    tj, tt = [], []
    for _ in range(repeats):  # alternate, as for certify
        _, sec = _timed(lambda: case.logits_fn(xj).block_until_ready())
        tj.append(sec)
        with torch.no_grad():
            _sync(case.device)
            _, sec = _timed(lambda: (model(xt), _sync(case.device)))
        tt.append(sec)
    return min(tj), min(tt)


# --------------------------------------------------------------------------- cases


def default_case(n: int, images: int, batch: int, device) -> Case:
    from soapbubble import data

    _, model_dir = main_job.default_model(progress=False, log=lambda *_: None)
    loaded = models.load_model(model_dir)
    torch_model = ref.small_cnn_from_flax(loaded.variables, loaded.meta.config, loaded.meta.input_shape)
    x = data.load_digits("test").images[:images].astype(np.float32)
    return Case("default model (small_cnn, 8x8x1 digits)", models.load(model_dir), torch_model, x, n, batch, device)


def resnet_case(arch: str, n: int, images: int, batch: int, device, workdir: str) -> Case:
    torch.manual_seed(0)
    model = ref.randomize_batchnorm(ref.cifar_model(arch), torch.Generator().manual_seed(1))
    ckpt = os.path.join(workdir, f"{arch}.pth.tar")
    ref.save_checkpoint(model, arch, ckpt)
    out = convert.convert_checkpoint(ckpt, os.path.join(workdir, arch))
    x = np.random.default_rng(2).uniform(0.0, 1.0, (images, 32, 32, 3)).astype(np.float32)
    return Case(f"CIFAR {arch}", models.load(out), model, x, n, batch, device)


# --------------------------------------------------------------------------- report


def _row(case: Case, r: dict) -> str:
    count, b = r["best_variant"]
    return (
        f"| {case.name} | {case.n:,} | {r['images']} | {1 / r['sb']:.2f} (batch {case.batch}) "
        f"| {1 / r['published']:.2f} "
        f"| {1 / r['best']:.2f} ({count}, batch {b}) | {r['published'] / r['sb']:.2f}x | **{r['best'] / r['sb']:.2f}x** "
        f"| {r['best_min'] / r['sb_min']:.2f}x |"
    )


def _split_row(case: Case, r: dict) -> str:
    rest_sb, rest_best = r["sb"] - r["fwd_sb"], r["best"] - r["fwd_best"]
    # A rest within timing noise of zero has no meaningful ratio.
    rest_ratio = f"{rest_best / rest_sb:.1f}x" if rest_sb > 0.02 * r["sb"] else "n/a (soapbubble's rest ~ 0)"
    return (
        f"| {case.name}, N = {case.n:,} | {r['sb']:.3f} = {r['fwd_sb']:.3f} + {rest_sb:.3f} "
        f"| {r['best']:.3f} = {r['fwd_best']:.3f} + {rest_best:.3f} "
        f"| {r['fwd_best'] / r['fwd_sb']:.2f}x | {rest_ratio} | {r['over_sb']:.3f} | {r['over_best']:.3f} |"
    )


def cpu_main(args) -> str:
    torch.set_num_threads(2)
    device = torch.device("cpu")
    q = args.quick
    repeats = 2 if q else args.repeats
    rows, checks, splits, others = [], [], [], []
    with tempfile.TemporaryDirectory() as work:
        # (arch, N, images, baseline count variants, batch sizes, probe images, baseline probe passes).
        # The ResNets' baseline probes only their published counting loop: counting <= 1,000
        # predictions in Python costs about a millisecond next to seconds of forward passes.
        # soapbubble probes the same batch sizes but the largest for the default model (one
        # more compiled program; 2,500 already covers what N = 10,000 gains from large batches).
        both, published = ("loop", "bincount"), ("loop",)
        plan = [("default", 1_000 if q else 10_000, 4 if q else 20, both, [250, 1000, 2500, 10_000], 4, 3)]
        rn = args.resnet_n
        plan += [("cifar_resnet20", rn or (200 if q else 1_000), 1 if (q or rn) else 3, published,
                  [100, 250, 1000], 1, 1)]
        plan += [("cifar_resnet110", rn or (100 if q else 200), 1 if (q or rn) else 2, published,
                  [100, 200], 1, 1)]
        for arch, n, images, counts, batches, probe, passes in plan:
            batches = sorted({min(b, n) for b in batches})
            sb_batches = [b for b in batches if b < 10_000]
            if arch == "default":
                case = default_case(n, images, 1000, device)
            else:
                case = resnet_case(arch, n, images, 1000, device, work)
            # The default model's runs take about a second each: more of them steady the medians.
            r = compare(case, repeats + 4 * (arch == "default"), counts, batches, sb_batches, probe, passes)
            others.append(r["others"])
            rows.append(_row(case, r))
            splits.append(_split_row(case, r))
            probe_txt = ", ".join(f"{c}/{b}: {t:.2f}" for (c, b), t in sorted(r["probe"].items()))
            sb_probe_txt = ", ".join(f"{b}: {t:.2f}" for b, t in sorted(r["sb_probe"].items()))
            checks.append(
                f"- {case.name}: max |logit difference| {r['logit_gap'][0]:.1e} (max |logit| {r['logit_gap'][1]:.2g}); "
                f"predictions agree on {r['agree']}/{r['images']} images, max |radius difference| "
                f"{r['radius_gap']:.3f} (mean radius {r['sb_radius_mean']:.3f}; the two draw different noise); "
                f"soapbubble's first call (compiling) {r['cold']:.1f} s; baseline pass over {probe} image(s), "
                f"seconds by count/batch (fastest of {passes}): {probe_txt}; soapbubble's, by batch: "
                f"{sb_probe_txt}; other processes used "
                f"{r['others']:.1f} of the 2 cores on average during this case."
            )
    sharing = sharing_sentence(max(others)).replace("on average", "on average in the busiest case")
    lines = [
        f"Machine: {machine()}; torch {torch.__version__}, {torch.get_num_threads()} threads. {sharing}",
        f"Command: `{command_line()}`",
        "",
        (f"Gaussian sigma = {SIGMA}, n0 = {N0}, alpha = {ALPHA}; each side at its fastest batch size "
        f"(a timed pass over the probe images, listed below); "
        f"images/second = images / median wall time of {repeats + 4} (default model) or {repeats} (ResNets) "
        "alternating runs; the last column "
        "divides each side's fastest run instead (the run least disturbed by other work). "
        "Default model: the first 20 digits test images; ResNets: random images."),
        "",
        ("| model | N | images | soapbubble img/s | PyTorch as published img/s | PyTorch best img/s (variant) "
        "| ratio vs published | ratio vs best | ratio vs best, fastest runs |"),
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        *rows,
        "",
        "Checks (identical weights, same answers):",
        "",
        *checks,
        "",
        "### Where the time goes",
        "",
        ("Seconds per image = forward pass + everything else (noise, counting, transfers, statistics, "
        "Python). PyTorch's forward share is timed inside its certify runs (the model wrapped in a "
        "timer); soapbubble's forward passes are fused into its compiled loop, so they are timed as bare "
        "jitted `logits_fn` calls on noisy batches of the same shapes (n0 pass and N pass) right after "
        "each certify run. Medians; certify / forward is the median of per-run ratios (goal <= 1.10 for "
        "soapbubble)."),
        "",
        ("| model | soapbubble s/img = fwd + rest | PyTorch best s/img = fwd + rest | forward ratio "
        "(oneDNN / XLA time) | rest ratio | soapbubble certify / forward | PyTorch certify / forward |"),
        "|---|---:|---:|---:|---:|---:|---:|",
        *splits,
        "",
        ("The certify / forward columns here are rough: few runs, and soapbubble's forward is timed one "
        "batch per call, with a dispatch each. The overhead at N = 100,000 (certify / bare forward on the "
        "same noisy samples, goal <= 1.10) is measured against one compiled loop in the *Certify overhead* "
        "section below (`bench_certify_overhead.py`)."),
    ]
    return "## soapbubble vs Cohen et al.'s PyTorch certify (issue 8)\n\n" + "\n".join(lines)


def gpu_main(args) -> str:
    """ResNet-110, N = 100,000, batch 400 on one GPU: both sides, and the bare forward limit."""
    if not torch.cuda.is_available():
        raise SystemExit("--gpu needs torch with CUDA and a visible GPU")
    if jax.devices()[0].platform != "gpu":
        raise SystemExit(f"--gpu needs jax with a GPU backend, got {jax.devices()[0].platform}")
    torch.backends.cudnn.benchmark = True
    device = torch.device("cuda")
    n, batch, images = (10_000, 400, 1) if args.quick else (100_000, 400, args.gpu_images)
    with tempfile.TemporaryDirectory() as work:
        case = resnet_case("cifar_resnet110", n, images, batch, device, work)
        _, cold = _timed(case.run_soapbubble)
        case.run_torch("bincount", batch, 1)  # warm up cuDNN autotuning
        t_sb, t_bin, t_loop = [], [], []
        for _ in range(args.gpu_repeats):
            _, t = _timed(case.run_soapbubble)
            t_sb.append(t / images)
            _, t = _timed(lambda: case.run_torch("bincount", batch))
            t_bin.append(t / images)
            _, t = _timed(lambda: case.run_torch("loop", batch, 1))
            t_loop.append(t)
        fwd_j, fwd_t = forward_seconds(case, batch, repeats=20)
        gap = case.logit_gap()
    # Forward passes alone, at batch 400, for n0 + N samples: no certifier can beat this.
    n = case.n
    limit_j, limit_t = (n + N0) / batch * fwd_j, (n + N0) / batch * fwd_t
    sb, tb, tl = (statistics.median(t) for t in (t_sb, t_bin, t_loop))
    lines = [
        (f"Device: jax {jax.devices()[0].device_kind}, torch {torch.cuda.get_device_name()}; {machine()}; "
        f"torch {torch.__version__}."),
        f"Command: `{command_line()}`",
        "",
        (f"CIFAR ResNet-110 (Cohen et al.'s layout, random init and BatchNorm statistics, converted), "
        f"N = {n:,}, n0 = {N0}, batch {batch}, sigma = {SIGMA}, {images} random image(s), median of "
        f"{args.gpu_repeats} alternating runs; soapbubble's first call (compiling) {cold:.1f} s; "
        f"max |logit difference| {gap[0]:.1e} (max |logit| {gap[1]:.2g})."),
        "",
        "| | seconds per image | bare forward img/s at batch 400 | forward-only limit, s per image |",
        "|---|---:|---:|---:|",
        f"| soapbubble | {sb:.2f} | {batch / fwd_j:,.0f} | {limit_j:.2f} |",
        f"| PyTorch Smooth.certify (bincount) | {tb:.2f} | {batch / fwd_t:,.0f} | {limit_t:.2f} |",
        f"| PyTorch Smooth.certify (as published, loop) | {tl:.2f} | | |",
        "",
        f"soapbubble / PyTorch: **{tb / sb:.2f}x** (vs as published {tl / sb:.2f}x).",
    ]
    return "## GPU: ResNet-110 at N = 100,000 (issue 8)\n\n" + "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write", action="store_true", help="update benchmarks/RESULTS.md")
    parser.add_argument("--quick", action="store_true", help="smaller N and fewer images (smoke test)")
    parser.add_argument("--repeats", type=int, default=3, help="alternating timed runs per case")
    parser.add_argument("--resnet-n", type=int, default=None,
                        help="N for both CIFAR ResNets, one image each (default: 1,000 and 200, 3 and 2 images)")
    parser.add_argument("--gpu", action="store_true", help="the GPU case (ResNet-110, N = 100,000, batch 400)")
    parser.add_argument("--gpu-images", type=int, default=2)
    parser.add_argument("--gpu-repeats", type=int, default=2)
    args = parser.parse_args()
    body = gpu_main(args) if args.gpu else cpu_main(args)
    print(body)
    if args.write:
        write_section("vs_cohen_gpu" if args.gpu else "vs_cohen", body)


if __name__ == "__main__":
    main()
