"""Load built kernel libraries and call them on torch tensors without host synchronisation.

Per-group shapes and operand pointers are computed by torch ops on the device (no ``.item()``,
no host copies), so a call is CUDA-graph capturable as long as its tensors keep their storage.
"""

from __future__ import annotations

import ctypes
import functools
import threading
from pathlib import Path

import torch

from .build import build, cached_library
from .space import DEFAULT_ORDER, KernelConfig, RoutingConfig, TileOrder, invalid_reason

_STATUS = {1: "bad argument", 2: "workspace too small", 3: "cannot implement",
           4: "initialize failed", 5: "launch failed"}
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class KernelError(RuntimeError):
    """A kernel call returned a failure status; the message carries the library's reason."""


class GroupedGemm:
    """A loaded sm90 ptr-array grouped GEMM: ``D_g = A_g @ B_g^T`` for every group g.

    Use :func:`load` to get one; calling it is :meth:`run` (raw pointer arrays) or
    :meth:`grouped_mm` (packed rows by offsets, the MoE case).
    """

    def __init__(self, config: KernelConfig, path: Path):
        self.config = config
        self.path = Path(path)
        lib = ctypes.CDLL(str(self.path))
        prefix = config.name
        self._workspace_size = getattr(lib, f"{prefix}_workspace_size")
        self._workspace_size.argtypes = [ctypes.c_int, ctypes.c_int]
        self._workspace_size.restype = ctypes.c_size_t
        self._run = getattr(lib, f"{prefix}_run")
        # ... workspace bytes, SM count, tile order (raster, swizzle), stream.
        self._run.argtypes = [ctypes.c_int] + [ctypes.c_void_p] * 5 + [
            ctypes.c_size_t] + [ctypes.c_int] * 3 + [ctypes.c_void_p]
        self._run.restype = ctypes.c_int
        self._run_dense = getattr(lib, f"{prefix}_run_dense")
        self._run_dense.argtypes = [ctypes.c_int] * 3 + [ctypes.c_void_p] * 4 + [
            ctypes.c_size_t] + [ctypes.c_int] * 3 + [ctypes.c_void_p]
        self._run_dense.restype = ctypes.c_int
        self._last_error = getattr(lib, f"{prefix}_last_error")
        self._last_error.restype = ctypes.c_char_p
        # Only the gemv libraries have the combine launch (fc2 with the MoE combine before it).
        self._combine_fits = getattr(lib, f"{prefix}_combine_fits", None)
        self._run_combine = getattr(lib, f"{prefix}_run_combine_dense", None)
        if self._run_combine is not None:
            self._combine_fits.argtypes = [ctypes.c_int] * 3
            self._combine_fits.restype = ctypes.c_int
            # m, n, k, top_k, y, weights, row_of, b, d, SM count, stream.
            self._run_combine.argtypes = [ctypes.c_int] * 4 + [ctypes.c_void_p] * 5 + [
                ctypes.c_int, ctypes.c_void_p]
            self._run_combine.restype = ctypes.c_int
        self._lib = lib
        self._workspaces: dict[tuple, torch.Tensor] = {}
        self._lock = threading.Lock()

    def workspace_size(self, groups: int, sm_count: int) -> int:
        """Bytes of workspace a call with ``groups`` groups needs on ``sm_count`` SMs."""
        return int(self._workspace_size(int(groups), int(sm_count)))

    def _workspace(self, groups: int, device: torch.device) -> tuple[torch.Tensor, int]:
        sms = sm_count(device)
        key = (device.index, groups)
        with self._lock:
            ws = self._workspaces.get(key)
            if ws is None:
                # Allocated once per (device, groups) and reused: a graph captured over a call
                # keeps pointing at it.
                ws = torch.empty(self.workspace_size(groups, sms), dtype=torch.uint8,
                                 device=device)
                self._workspaces[key] = ws
        return ws, sms

    def run(self, problem_mnk: torch.Tensor, ptr_a: torch.Tensor, ptr_b: torch.Tensor,
            ptr_d: torch.Tensor, order: TileOrder = DEFAULT_ORDER) -> None:
        """Launch on the current stream with device arrays already built; ``order`` is the
        tile order (:class:`~autotune.space.TileOrder`, a launch argument).

        Requirements
        ------------
        ``problem_mnk`` int32 [G, 3] (M, N, K per group), ``ptr_a``/``ptr_b``/``ptr_d`` int64 [G]
        device addresses, all on one CUDA device; A_g [M, K], B_g [N, K], D_g [M, N] row-major,
        16-byte aligned, of the config's dtype.
        """
        groups = problem_mnk.shape[0]
        device = problem_mnk.device
        ws, sms = self._workspace(groups, device)
        stream = torch.cuda.current_stream(device).cuda_stream
        status = self._run(groups, problem_mnk.data_ptr(), ptr_a.data_ptr(), ptr_b.data_ptr(),
                           ptr_d.data_ptr(), ws.data_ptr(), ws.numel(), sms, *order.abi, stream)
        self._check(status)

    def _check(self, status: int) -> None:
        if status != 0:
            reason = self._last_error().decode(errors="replace")
            raise KernelError(f"{self.config.name}: {_STATUS.get(status, status)}: {reason}")

    @property
    def out_dtype(self) -> torch.dtype:
        """dtype of D: fp32 for the "f32" epilogue, else the operands' dtype."""
        return torch.float32 if self.config.epilogue == "f32" else _DTYPES[self.config.dtype]

    def dense(self, a: torch.Tensor, b: torch.Tensor, out: torch.Tensor,
              order: TileOrder = DEFAULT_ORDER) -> torch.Tensor:
        """``out = epilogue(a @ b.T)`` as one group; a [M, K], b [N, K], out [M, N] contiguous.

        Requirements
        ------------
        CUDA tensors on one device, a and b of the config's dtype, out of :attr:`out_dtype`,
        K and N multiples of 8. Nothing is checked on this hot path beyond what the kernel
        rejects itself: callers validate once per shape.
        """
        (m, k), n = a.shape, b.shape[0]
        ws, sms = self._workspace(1, a.device)
        stream = torch.cuda.current_stream(a.device).cuda_stream
        self._check(self._run_dense(m, n, k, a.data_ptr(), b.data_ptr(), out.data_ptr(),
                                    ws.data_ptr(), ws.numel(), sms, *order.abi, stream))
        return out

    def combines(self, tokens: int, k: int, top_k: int) -> bool:
        """Whether :meth:`combine_dense` takes ``tokens`` tokens of ``k`` columns with
        ``top_k`` pairs each (gemv libraries, a few tokens)."""
        return self._run_combine is not None and bool(self._combine_fits(tokens, k, top_k))

    def combine_dense(self, y: torch.Tensor, weights: torch.Tensor, row_of: torch.Tensor,
                      b: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """``out[t] = epilogue(b @ a[t])`` with ``a[t] = sum_j weights[t, j] * y[row_of[t * top_k
        + j]]`` (summed in fp32 in a fixed order, rounded to y's dtype): the MoE combine and
        fc2 in one launch.

        Requirements
        ------------
        :meth:`combines` holds; y [rows, K] and b [N, K] of the config's dtype, weights
        [T, top_k] fp32, row_of [T * top_k] int32 rows of y, out [T, N] of :attr:`out_dtype`,
        all contiguous on one CUDA device; K a multiple of 8. As for :meth:`dense`, nothing is
        checked here beyond what the kernel rejects.
        """
        (t, top_k), (n, k) = weights.shape, b.shape
        stream = torch.cuda.current_stream(y.device).cuda_stream
        self._check(self._run_combine(t, n, k, top_k, y.data_ptr(), weights.data_ptr(),
                                      row_of.data_ptr(), b.data_ptr(), out.data_ptr(),
                                      sm_count(y.device), stream))
        return out

    def grouped_mm(self, a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor,
                   out: torch.Tensor | None = None,
                   order: TileOrder = DEFAULT_ORDER) -> torch.Tensor:
        """``out[rows of g] = a[rows of g] @ b[g].T``, rows of g = ``offs[g-1]:offs[g]``.

        The same contract as ``torch._grouped_mm(a, b.transpose(1, 2), offs=offs)``.

        Parameters
        ----------
        a : Tensor [M_total, K]
        b : Tensor [G, N, K]
        offs : int32 Tensor [G], cumulative row ends (non-decreasing, last <= M_total)
        out : Tensor [M_total, N], optional
        order : TileOrder, optional
            Tile order of the launch (sm90 takes every :data:`~autotune.space.TILE_ORDERS`).

        Requirements
        ------------
        CUDA tensors on one device, dtype of the config, contiguous; K and N multiples of 8.
        Rows past ``offs[-1]`` of ``out`` are left untouched.
        """
        _check_grouped_mm(self.config, a, b, offs)
        if out is None:
            out = torch.empty((a.shape[0], b.shape[1]), dtype=self.out_dtype, device=a.device)
        self.run(*group_arrays(a, b, offs, out), order=order)
        return out


def group_arrays(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor,
                 out: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Per-group (M, N, K) and A/B/D addresses of packed rows, built by device ops (no sync).

    Group g owns rows ``offs[g-1]:offs[g]`` of ``a`` and ``out`` and matrix ``b[g]``; returns
    ``(mnk int32 [G, 3], ptr_a, ptr_b, ptr_d int64 [G])`` as :meth:`GroupedGemm.run` takes them.
    """
    ends = offs.to(torch.int64)
    starts = torch.cat([ends.new_zeros(1), ends[:-1]])
    groups, n, k = b.shape
    mnk = torch.stack([ends - starts, torch.full_like(ends, n), torch.full_like(ends, k)],
                      dim=1).to(torch.int32).contiguous()
    ptr_a = a.data_ptr() + starts * (k * a.element_size())
    ptr_b = b.data_ptr() + torch.arange(groups, device=a.device) * (n * k * b.element_size())
    ptr_d = out.data_ptr() + starts * (n * out.element_size())
    return mnk, ptr_a, ptr_b, ptr_d


def _check_grouped_mm(config: KernelConfig, a, b, offs) -> None:
    want = _DTYPES[config.dtype]
    if a.dim() != 2 or b.dim() != 3:
        raise ValueError(f"a must be 2-D [M, K] and b 3-D [G, N, K]; got {tuple(a.shape)} and "
                         f"{tuple(b.shape)}")
    if a.shape[1] != b.shape[2]:
        raise ValueError(f"a's K ({a.shape[1]}) must equal b's K ({b.shape[2]})")
    if offs.dtype != torch.int32 or offs.dim() != 1 or offs.shape[0] != b.shape[0]:
        raise ValueError(f"offs must be int32 [G={b.shape[0]}], got {offs.dtype} "
                         f"{tuple(offs.shape)}")
    for name, t in (("a", a), ("b", b)):
        if t.dtype != want:
            raise TypeError(f"{name}: expected dtype {want} for {config.name}, got {t.dtype}")
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous; call .contiguous()")
    if not (a.is_cuda and b.device == a.device and offs.device == a.device):
        raise ValueError("a, b and offs must be CUDA tensors on one device, got "
                         f"{a.device}, {b.device}, {offs.device}")
    if a.shape[1] % 8 or b.shape[1] % 8:
        raise ValueError(f"K ({a.shape[1]}) and N ({b.shape[1]}) must be multiples of 8 "
                         "(16-byte rows for TMA)")


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """SM count of a CUDA device (cached; never a device synchronisation)."""
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


class Routing:
    """The loaded routing/bookkeeping kernels (see templates/moe_routing.cuh).

    Methods take tensors and launch on the current stream; sizes are passed as plain ints and
    nothing is read back to the host.
    """

    _SIGNATURES = {
        "route_gather": [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_int,
                         ctypes.c_void_p] + [ctypes.c_int] * 7 + [ctypes.c_float]
        + [ctypes.c_void_p] * 15 + [ctypes.c_int] * 3
        + [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_void_p, ctypes.c_int,
           ctypes.c_void_p],
        "swiglu": [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int,
                   ctypes.c_void_p],
        "combine": [ctypes.c_void_p] * 3 + [ctypes.c_int] * 3 + [ctypes.c_void_p] * 2,
    }

    def __init__(self, config: RoutingConfig, path: Path):
        self.config = config
        self.path = Path(path)
        self._lib = ctypes.CDLL(str(self.path))
        self._fns = {}
        for name, argtypes in self._SIGNATURES.items():
            fn = getattr(self._lib, f"{config.name}_{name}")
            fn.argtypes, fn.restype = argtypes, ctypes.c_int
            self._fns[name] = fn
        self._last_error = getattr(self._lib, f"{config.name}_last_error")
        self._last_error.restype = ctypes.c_char_p

    def __call__(self, kernel: str, *args) -> None:
        """Launch ``kernel`` with ``args`` (tensors become addresses) and the current stream."""
        raw = [a.data_ptr() if isinstance(a, torch.Tensor) else a for a in args]
        status = self._fns[kernel](*raw, torch.cuda.current_stream().cuda_stream)
        if status != 0:
            reason = self._last_error().decode(errors="replace")
            raise KernelError(f"{self.config.name}.{kernel}: {reason}")


_LOADED: dict[str, GroupedGemm | Routing] = {}


def load_routing(config: RoutingConfig, compile_if_missing: bool = True) -> Routing:
    """The loaded routing kernels of ``config``, compiled into the cache on first use."""
    if config.name not in _LOADED:
        _LOADED[config.name] = Routing(config, _library(config, compile_if_missing))
    return _LOADED[config.name]


def _library(config, compile_if_missing: bool) -> Path:
    reason = invalid_reason(config)
    if reason:
        raise ValueError(f"config {config.name} is invalid: {reason}")
    path = cached_library(config)
    if path is None:
        if not compile_if_missing:
            raise KernelError(f"{config.name} is not built; run `python -m autotune "
                              f"--arch {config.arch}` or load with compile_if_missing=True")
        (result,) = build([config])
        if not result.ok:
            raise KernelError(f"compiling {config.name} failed:\n{result.log}")
        path = result.path
    return path


def load(config: KernelConfig, compile_if_missing: bool = True) -> GroupedGemm:
    """The loaded library of ``config``, compiling it into the cache on first use.

    Requirements
    ------------
    ``config`` is valid; nvcc and CUTLASS are present if the library is not cached. A failed
    compile raises :class:`KernelError` with the compiler's log tail.
    """
    if config.name not in _LOADED:
        _LOADED[config.name] = GroupedGemm(config, _library(config, compile_if_missing))
    return _LOADED[config.name]
