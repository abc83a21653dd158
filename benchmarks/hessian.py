"""Hessian diagnostics speed: HVP vs plain backward, and ours vs PyHessian (or a naive loop) at equal iterations.

Measured in one run, on the CPU and on CUDA when present, on ``SmallCNN`` (width 16, 27k parameters) with batches of
128 Fashion-MNIST-shaped images (the real images when Debian's Fashion-MNIST is installed):

1. **HVP cost**: one Hessian-vector product of ``HessianOperator`` (double backward on a kept gradient graph, with
   eval-mode BatchNorm folded into the convolution before it, and without that folding; and recomputing the graph
   each time) and of ``torch.func`` forward-over-reverse (``jvp(grad(f))``), each divided by one plain forward +
   backward (``autograd.grad`` of the loss); the same for ResNet-18 (batch 32) on the lean and on autograd's graph.
   Both float32 products are compared with autograd's own product in float64 (nothing rewritten).
2. **Top eigenvalue and trace at equal iterations**: our power iteration, our Lanczos and our Hutchinson trace
   against PyHessian's ``eigenvalues(maxIter=N, tol=0)`` / ``trace(maxIter=N, tol=-inf)`` (exactly N products
   each; see ``base_trace`` for the -inf), on 1 batch (PyHessian's ``data=`` mode, which keeps the graph too) and
   on 2 batches (its ``dataloader=`` mode, which redoes forward and backward at every product). Without
   PyHessian installed (``pip install pyhessian``; it is not a dependency of this project) the baseline is a naive
   double-backward loop written here. The same comparison on one batch for an MLP without BatchNorm (784-256-256-10,
   tanh), where there is nothing to fold.
3. **Products to a 1e-3 relative accuracy** of the top eigenvalue from the same start vector (Lanczos vs power
   iteration), and the **top 3 eigenvalues** with each library's own stopping rule at tol=1e-3 (PyHessian: power
   iteration with deflation, one eigenvalue after the other; ours: one Lanczos run), time and error against a
   converged reference.

Each timing is the minimum over ``--repeats`` runs (a shared machine: the minimum is the least disturbed).

Usage::

    python benchmarks/hessian.py                       # writes results/hessian_bench_cpu.json (+ _cuda.json)
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent


def _data(n_batches: int, batch: int, device: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    try:
        from lightning_sam.data.fashion_mnist import find_fashion_mnist, load_fashion_mnist, normalize

        images, labels = load_fashion_mnist(find_fashion_mnist(), train=True)
        x, y = normalize(images[: n_batches * batch]), labels[: n_batches * batch]
        source = "Fashion-MNIST"
    except (FileNotFoundError, ValueError):
        g = torch.Generator().manual_seed(0)
        x, y = torch.randn(n_batches * batch, 1, 28, 28, generator=g), torch.randint(0, 10, (n_batches * batch,))
        source = "random"
    batches = [
        (x[i * batch : (i + 1) * batch].to(device), y[i * batch : (i + 1) * batch].to(device)) for i in range(n_batches)
    ]
    return batches, source


def _model(device: str) -> torch.nn.Module:
    from lightning_sam.models import SmallCNN

    torch.manual_seed(0)
    model = SmallCNN(width=16).to(device)
    # A few SGD steps away from the initialization, so the spectrum is that of a model in training.
    batches, _ = _data(4, 128, device)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(3):
        for x, y in batches:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    opt.zero_grad(set_to_none=True)
    return model.eval()


def _time(fn: Callable[[], Any], repeats: int, device: str) -> tuple[float, Any]:
    best, out = float("inf"), None
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = fn()
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best, out


def loss_fn(model: torch.nn.Module, batch: Any) -> torch.Tensor:
    return F.cross_entropy(model(batch[0]), batch[1])


# ---------------------------------------------------------------------------------------------- naive baseline
class NaiveHessian:
    """The textbook loop: per product and per batch, forward, ``backward(create_graph=True)``, then grad of
    (g·v) summed parameter by parameter in Python; power iteration and Hutchinson with per-tensor lists."""

    def __init__(self, model: torch.nn.Module, batches: list[Any]) -> None:
        self.model, self.batches = model, batches
        self.params = [p for p in model.parameters() if p.requires_grad]

    def hvp(self, v: list[torch.Tensor]) -> list[torch.Tensor]:
        out = [torch.zeros_like(p) for p in self.params]
        for batch in self.batches:
            grads = torch.autograd.grad(loss_fn(self.model, batch), self.params, create_graph=True)
            dot = sum((g * u).sum() for g, u in zip(grads, v))
            for o, h in zip(out, torch.autograd.grad(dot, self.params)):
                o.add_(h / len(self.batches))
        return out

    def top_eigenvalue(self, iters: int) -> float:
        v = [torch.randn_like(p) for p in self.params]
        value = 0.0
        for _ in range(iters):
            norm = torch.sqrt(sum((u**2).sum() for u in v))
            v = [u / norm for u in v]
            hv = self.hvp(v)
            value = float(sum((h * u).sum() for h, u in zip(hv, v)))
            v = hv
        return value

    def trace(self, iters: int) -> float:
        total = 0.0
        for _ in range(iters):
            v = [torch.randint_like(p, high=2) * 2 - 1 for p in self.params]
            total += float(sum((h * u).sum() for h, u in zip(self.hvp(v), v)))
        return total / iters


def _pyhessian() -> Any:
    try:
        from pyhessian import hessian

        return hessian
    except ImportError:
        return None


def _mlp(device: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(784, 256), torch.nn.Tanh(), torch.nn.Linear(256, 256), torch.nn.Tanh(), torch.nn.Linear(256, 10)
    ).to(device)


def equal_iterations(
    model: torch.nn.Module, batch_sets: dict[str, list[Any]], iters: int, repeats: int, device: str
) -> dict[str, Any]:
    """Ours vs the baseline at exactly ``iters`` Hessian products each, for each set of batches."""
    from lightning_sam.diagnostics import hessian_eigenvalues, hessian_trace

    PyHessian = _pyhessian()
    baseline = "naive" if PyHessian is None else "pyhessian"
    rows = {}
    for label, batches in batch_sets.items():
        row: dict[str, Any] = {}

        def ours_power() -> float:
            return float(hessian_eigenvalues(model, loss_fn, batches, method="power", max_iter=iters, tol=0.0)[0])

        def ours_lanczos() -> float:
            return float(hessian_eigenvalues(model, loss_fn, batches, max_iter=iters, tol=0.0)[0])

        def ours_trace() -> float:
            return hessian_trace(model, loss_fn, batches, num_probes=iters, tol=None).trace

        if baseline == "pyhessian":

            def make() -> Any:
                model.zero_grad(set_to_none=True)
                if len(batches) == 1:
                    return PyHessian(model, F.cross_entropy, data=batches[0], cuda=device == "cuda")
                return PyHessian(model, F.cross_entropy, dataloader=batches, cuda=device == "cuda")

            def base_power() -> float:
                return make().eigenvalues(maxIter=iters, tol=0.0, top_n=1)[0][0]

            def base_trace() -> float:
                # tol=-inf: exactly `iters` probes. (With tol >= 0 PyHessian stops as soon as its running mean is
                # negative: its stopping rule divides by the signed previous mean, not its absolute value.)
                samples = make().trace(maxIter=iters, tol=float("-inf"))
                assert len(samples) == iters
                return float(sum(samples) / iters)

        else:

            def base_power() -> float:
                return NaiveHessian(model, batches).top_eigenvalue(iters)

            def base_trace() -> float:
                return NaiveHessian(model, batches).trace(iters)

        for name, fn in (
            ("baseline_power_s", base_power),
            ("ours_power_s", ours_power),
            ("ours_lanczos_s", ours_lanczos),
            ("baseline_trace_s", base_trace),
            ("ours_trace_s", ours_trace),
        ):
            # PyHessian leaves its gradient graph in `.grad`: drop it so that no run pays for the previous one's memory.
            model.zero_grad(set_to_none=True)
            model.eval()
            gc.collect()
            torch.manual_seed(0)
            seconds, value = _time(fn, repeats, device)
            row[name] = seconds
            row[name.replace("_s", "_value")] = value
        model.zero_grad(set_to_none=True)
        model.eval()
        row["ratio_power"] = row["ours_power_s"] / row["baseline_power_s"]
        row["ratio_lanczos_vs_baseline_power"] = row["ours_lanczos_s"] / row["baseline_power_s"]
        row["ratio_trace"] = row["ours_trace_s"] / row["baseline_trace_s"]
        rows[label] = row
    return rows


def hvp_resnet18(device: str, repeats: int) -> dict[str, Any]:
    """One product on ResNet-18 (initialization, eval mode), lean graph vs autograd's, against forward+backward."""
    from lightning_sam.diagnostics import HessianOperator
    from lightning_sam.models import ResNet18

    torch.manual_seed(0)
    model = ResNet18(in_channels=1).to(device).eval()
    batches, _ = _data(1, 32, device)
    params = [p for p in model.parameters() if p.requires_grad]
    t_fb, _ = _time(lambda: torch.autograd.grad(loss_fn(model, batches[0]), params), repeats, device)
    lean = HessianOperator(model, loss_fn, batches, params)
    v = torch.randn(lean.numel, device=device, generator=torch.Generator(device).manual_seed(0))
    t_lean, hv_lean = _time(lambda: lean(v), repeats, device)
    lean = None
    plain = HessianOperator(model, loss_fn, batches, params, lean_graph=False)
    t_plain, hv_plain = _time(lambda: plain(v), repeats, device)
    return {
        "model": "ResNet18(in_channels=1), eval mode, at initialization",
        "parameters": sum(p.numel() for p in params),
        "batch": 32,
        "forward_backward_ms": 1000 * t_fb,
        "hvp_lean_graph_ms": 1000 * t_lean,
        "hvp_autograd_graph_ms": 1000 * t_plain,
        "ratio_lean": t_lean / t_fb,
        "ratio_autograd_graph": t_plain / t_fb,
        **_errors_vs_float64(model, batches, v, {"hvp_lean_graph": hv_lean, "hvp_autograd_graph": hv_plain}),
    }


def _errors_vs_float64(
    model: torch.nn.Module, batches: list[Any], v: torch.Tensor, products: dict[str, torch.Tensor]
) -> dict[str, float]:
    """Relative error of each float32 product against autograd's own product in float64 (nothing rewritten)."""
    from lightning_sam.diagnostics import HessianOperator

    model64 = copy.deepcopy(model).double()
    batches64 = [(x.double(), y) for x, y in batches]
    params64 = [p for p in model64.parameters() if p.requires_grad]
    reference = HessianOperator(model64, loss_fn, batches64, params64, lean_graph=False)(v.double())
    return {
        f"{name}_relative_error_vs_float64": float((hv.double() - reference).norm() / reference.norm())
        for name, hv in products.items()
    }


def bench(device: str, iters: int, repeats: int) -> dict[str, Any]:
    from torch.func import functional_call, grad, jvp

    from lightning_sam.diagnostics import HessianOperator, hessian_eigenvalues

    model = _model(device)
    params = [p for p in model.parameters() if p.requires_grad]
    result: dict[str, Any] = {
        "device": device,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "model": "SmallCNN(width=16)",
        "parameters": sum(p.numel() for p in params),
        "batch": 128,
        "iterations": iters,
        "repeats": repeats,
    }
    one, source = _data(1, 128, device)
    two, _ = _data(2, 128, device)
    result["data"] = source

    # 1. HVP vs forward + backward
    def forward_backward() -> None:
        torch.autograd.grad(loss_fn(model, one[0]), params)

    forward_backward()
    t_fb, _ = _time(lambda: [forward_backward() for _ in range(10)], repeats, device)
    op = HessianOperator(model, loss_fn, one, params, cache_graph=True)
    op_unfolded = HessianOperator(model, loss_fn, one, params, cache_graph=True, lean_graph=False)
    op_nocache = HessianOperator(model, loss_fn, one, params, cache_graph=False)
    v = torch.randn(op.numel, device=device)
    op(v)
    t_hvp, _ = _time(lambda: [op(v) for _ in range(10)], repeats, device)
    t_hvp_unfolded, _ = _time(lambda: [op_unfolded(v) for _ in range(10)], repeats, device)
    t_hvp_nc, _ = _time(lambda: [op_nocache(v) for _ in range(10)], repeats, device)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    fparams = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    fv = dict(zip(names, op._views(v)))

    def f(p: dict[str, torch.Tensor]) -> torch.Tensor:
        return F.cross_entropy(functional_call(model, p, (one[0][0],)), one[0][1])

    relu_inplace = [m for m in model.modules() if getattr(m, "inplace", False)]
    for m in relu_inplace:  # forward-mode AD cannot run through in-place ReLU
        m.inplace = False
    t_fwdrev, _ = _time(lambda: [jvp(grad(f), (fparams,), (fv,)) for _ in range(10)], repeats, device)
    for m in relu_inplace:
        m.inplace = True
    result["hvp_accuracy"] = _errors_vs_float64(
        model, one, v, {"hvp_lean_graph": op(v), "hvp_autograd_graph": op_unfolded(v)}
    )
    op = op_unfolded = op_nocache = None  # free the kept graphs before the timings below
    gc.collect()
    result["hvp"] = {
        "forward_backward_ms": 100 * t_fb,
        "hvp_cached_graph_ms": 100 * t_hvp,
        "hvp_cached_graph_unfolded_batch_norm_ms": 100 * t_hvp_unfolded,
        "hvp_recomputed_graph_ms": 100 * t_hvp_nc,
        "hvp_forward_over_reverse_ms": 100 * t_fwdrev,
        "ratio_cached": t_hvp / t_fb,
        "ratio_cached_unfolded_batch_norm": t_hvp_unfolded / t_fb,
        "ratio_recomputed": t_hvp_nc / t_fb,
        "ratio_forward_over_reverse": t_fwdrev / t_fb,
    }

    # 2. equal iterations: the CNN on 1 and 2 batches; an MLP without BatchNorm on 1 batch
    result["baseline"] = "pyhessian" if _pyhessian() is not None else "naive"
    result["equal_iterations"] = equal_iterations(model, {"1 batch": one, "2 batches": two}, iters, repeats, device)
    mlp, mlp_batches = _mlp(device), [(x.flatten(1), y) for x, y in one]
    result["equal_iterations_mlp"] = {
        "model": "MLP 784-256-256-10, tanh, no BatchNorm",
        "parameters": sum(p.numel() for p in mlp.parameters()),
        **equal_iterations(mlp, {"1 batch": mlp_batches}, iters, repeats, device),
    }

    # 3. iterations (Hessian products) to a 1e-3 relative accuracy of the top eigenvalue, 1 batch, same start vector
    from lightning_sam.diagnostics.hessian import _lanczos, _rademacher, _tridiagonal

    reference = float(hessian_eigenvalues(model, loss_fn, one, max_iter=200, tol=1e-9)[0])
    op = HessianOperator(model, loss_fn, one, params)
    v0 = _rademacher((op.numel,), torch.Generator().manual_seed(0), op.dtype, op.device)
    lanczos_curve, power_curve = [], []
    steps = _lanczos(op, v0, 60)
    for j in range(1, len(steps.alphas) + 1):
        theta = torch.linalg.eigvalsh(_tridiagonal(steps.alphas[:j].tolist(), steps.betas[: j - 1].tolist()))
        lanczos_curve.append(abs(float(theta[-1]) - reference) / reference)
    v = v0 / v0.norm()
    for _ in range(200):  # PyHessian's power iteration, product by product
        hv = op(v)
        power_curve.append(abs(float(hv @ v) - reference) / reference)
        v = hv / hv.norm()

    def first_below(curve: list[float]) -> int:
        return next((i + 1 for i, e in enumerate(curve) if e <= 1e-3), -1)

    accuracy = {
        "reference": reference,
        "lanczos_products_to_1e-3": first_below(lanczos_curve),
        "power_products_to_1e-3": first_below(power_curve),
        "lanczos_rel_error": lanczos_curve,
        "power_rel_error": power_curve,
    }
    reference3 = hessian_eigenvalues(model, loss_fn, one, k=3, max_iter=200, tol=1e-9).tolist()
    accuracy["top3_reference"] = reference3
    seconds, value = _time(
        lambda: hessian_eigenvalues(model, loss_fn, one, k=3, max_iter=100, tol=1e-3).tolist(), repeats, device
    )
    accuracy["top3_ours_lanczos"] = {
        "seconds": seconds,
        "values": value,
        "max_rel_error": max(abs(a - b) / abs(b) for a, b in zip(value, reference3)),
    }
    PyHessian = _pyhessian()
    if PyHessian is not None:

        def pyhessian_top3() -> list[float]:
            model.zero_grad(set_to_none=True)
            values = PyHessian(model, F.cross_entropy, data=one[0], cuda=device == "cuda").eigenvalues(top_n=3)[0]
            return sorted(values, reverse=True)

        torch.manual_seed(0)
        seconds, value = _time(pyhessian_top3, repeats, device)
        model.zero_grad(set_to_none=True)
        model.eval()
        accuracy["top3_pyhessian"] = {
            "seconds": seconds,
            "values": value,
            "max_rel_error": max(abs(a - b) / abs(b) for a, b in zip(value, reference3)),
        }
    result["to_tolerance"] = accuracy
    # Last: its 11M-parameter graphs would leave the allocator fragmented for the timings above.
    result["hvp_resnet18"] = hvp_resnet18(device, repeats)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=ROOT / "results")
    parser.add_argument("--devices", nargs="+", default=None, help="default: cpu, and cuda when present")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    devices = args.devices or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    for device in devices:
        result = bench(device, args.iterations, args.repeats)
        path = args.out / f"hessian_bench_{device}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result, indent=2))
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
