"""The C kernels (`_kernels.c`: int8 / int4 / bf16 weights), compiled on first use, called through ctypes.

    lib = native.library()      # None where it cannot be built: callers use the pure-PyTorch kernels

The library is built with the system C compiler (`$CC`, default `cc`) as
`cc -O3 -fopenmp -shared -fPIC -march=native` (`$DSV2_CFLAGS` replaces `-march=native`), into a cache
folder keyed by the source, the compiler command and this CPU's feature flags (`$DSV2_CACHE`, default
`~/.cache/dsv2`), written atomically so that concurrent processes never load a half-written file. It
takes about a second; a failed build warns once and leaves the PyTorch path in use.
`DSV2_NATIVE_KERNELS=0` turns the library off.

It holds no PyTorch code (no torch headers, so no minute-long extension build, and no ABI coupling to a
torch version): the wrappers below pass raw pointers of contiguous CPU tensors.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("_kernels.c")
FLAGS = ["-O3", "-fopenmp", "-shared", "-fPIC"]
ARCH = "-march=native"  # $DSV2_CFLAGS replaces it (e.g. "-mavx2 -mfma" or "" for the portable scalar build)
_state: dict[str, object] = {}

_i64, _int, _p = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p
_SIGNATURES = {
    "dsv2_int8_gemv": [_p, _p, _p, _int, _p, _i64, _i64, _i64, _int],
    "dsv2_int8_dequant": [_p, _p, _int, _p, _int, _i64, _i64, _i64, _int],
    "dsv2_int4_dequant": [_p, _p, _int, _p, _int, _i64, _i64, _i64, _i64, _i64, _int],
    "dsv2_bf16_bgemv": [_p, _int, _i64, _p, _i64, _i64, _p, _i64, _i64, _i64, _i64, _i64, _int],
    "dsv2_int8_gemv_bf16": [_p, _p, _p, _int, _p, _p, _i64, _i64, _i64, _int],
    "dsv2_int4_gemv": [_p, _p, _p, _p, _p, _i64, _i64, _i64, _i64, _int],
    "dsv2_latent_decode_bf16": [_p, _i64, _i64, _i64, _p, _p, _i64, _i64, ctypes.c_float, _p, _int],
    "dsv2_quant_q8": [_p, _int, _p, _p, _i64, _i64],
    "dsv2_round_q8": [_p, _int, _p, _int, _i64, _i64, _int],
    "dsv2_int8_gemv_q8": [_p, _p, _p, _p, _int, _p, _i64, _i64, _i64, _int],
    "dsv2_int4_gemv_q8": [_p, _int, _p, _p, _p, _p, _p, _p, _i64, _i64, _i64, _i64, _int],
    "dsv2_int4_gemm_q8": [_p, _int, _p, _p, _p, _p, _p, _p, _i64, _i64, _i64, _i64, _int],
    "dsv2_gemm": [_p, _int, _i64, _p, _int, _i64, _p, _int, _i64, _p, _i64, _i64, _i64, _i64, _int],
    "dsv2_rms_norm": [_p, _int, _i64, _p, _int, _p, _int, _i64, _i64, ctypes.c_float, _int],
    "dsv2_rope": [_p, _int, _i64, _i64, _p, _p, _p, _i64, _i64, _i64],
    "dsv2_silu_mul": [_p, _p, _int, _i64, _i64, _p, _i64, _i64, _int],
}


def enabled() -> bool:
    return os.environ.get("DSV2_NATIVE_KERNELS", "1") not in ("0", "false", "no", "off")


def _cpu_flags() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor()


def _flags() -> list[str]:
    return [*FLAGS, *os.environ.get("DSV2_CFLAGS", ARCH).split()]


def _build(cc: str, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        subprocess.run([cc, *_flags(), str(SOURCE), "-o", tmp, "-lm"], check=True, capture_output=True, text=True,
                       timeout=120)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def library() -> ctypes.CDLL | None:
    """The loaded kernel library, building it first if needed; None when disabled or unbuildable. The
    answer is kept (kernels ask on every call): `reset()` makes the next call look at the environment again."""
    if "lib" in _state:
        return _state["lib"]  # type: ignore[return-value]
    if not enabled():
        _state["lib"] = None
        return None
    lib = None
    cc = os.environ.get("CC", "cc")
    try:
        if platform.system() != "Linux" or shutil.which(cc) is None:
            raise OSError(f"no C compiler {cc!r} (or not Linux)")
        key = hashlib.sha256(SOURCE.read_bytes() + " ".join([cc, *_flags()]).encode() + _cpu_flags().encode())
        cache = Path(os.environ.get("DSV2_CACHE", Path.home() / ".cache" / "dsv2"))
        target = cache / "kernels" / key.hexdigest()[:16] / "libdsv2quant.so"
        if not target.exists():
            _build(cc, target)
        lib = ctypes.CDLL(str(target))
        for name, args in _SIGNATURES.items():
            fn = getattr(lib, name)
            fn.argtypes, fn.restype = args, None
        for flag in _FLAGS:
            getattr(lib, flag).argtypes, getattr(lib, flag).restype = [], _int
    except (OSError, subprocess.SubprocessError) as e:
        detail = getattr(e, "stderr", "") or ""
        why = f"{e}: {detail[-500:]}" if detail else str(e)
        warnings.warn(f"dsv2: the C kernels could not be built ({why}); using PyTorch's kernels",
                      RuntimeWarning, stacklevel=2)
        lib = None
    _state["lib"] = lib
    return lib


_FLAGS = ("dsv2_int4_gemv_fast", "dsv2_int8_gemv_bf16_fast", "dsv2_q8_fast", "dsv2_gemm_fast")


def _flag(lib: ctypes.CDLL, name: str) -> int:
    """One of the library's build flags (which vector paths it has), read once per library: kernels ask on every
    call, and torch.compile's tracing (`precision.CpuLinear` decides there) cannot call into ctypes."""
    cached = _state.get("flags")
    if cached is None or cached[0] is not lib:
        cached = (lib, {f: int(getattr(lib, f)()) for f in _FLAGS})
        _state["flags"] = cached
    return cached[1][name]


def reset() -> None:
    """Forget the loaded library (tests: rebuild under another environment)."""
    _state.clear()


def _ptr(t: torch.Tensor) -> int:
    return t.data_ptr()


def _row(t: torch.Tensor, r: int) -> int:
    """The address of row r of a 2-D tensor (what `_ptr(t[r:])` gives, without making the view)."""
    return t.data_ptr() + r * t.stride(0) * t.element_size()


def _scale_flag(t: torch.Tensor) -> int:
    if t.dtype not in (torch.float32, torch.bfloat16) or not t.is_contiguous():
        raise TypeError(f"scales must be contiguous fp32 or bf16, got {t.dtype}")
    return int(t.dtype == torch.bfloat16)


def supports(x: torch.Tensor, *scales: torch.Tensor) -> bool:
    """Whether the C kernels can take these activations and scales (CPU, fp32/bf16)."""
    return (x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16)
            and all(s.dtype in (torch.float32, torch.bfloat16) for s in scales))


def int8_gemv(lib: ctypes.CDLL, x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x (M,K) any float dtype -> (M,N) fp32 = x @ (q·scale)ᵀ."""
    xf = x.float().contiguous()
    q, scale = q.contiguous(), scale.contiguous()
    m, k = xf.shape
    n = q.shape[0]
    y = torch.empty(m, n, dtype=torch.float32)
    lib.dsv2_int8_gemv(_ptr(xf), _ptr(q), _ptr(scale), _scale_flag(scale), _ptr(y), m, n, k, torch.get_num_threads())
    return y


def _gemv_input(x: torch.Tensor) -> torch.Tensor:
    return (x if x.dtype in (torch.bfloat16, torch.float32) else x.float()).contiguous()


def fast_int8_bf16_gemv(lib: ctypes.CDLL) -> bool:
    """Whether this build's `dsv2_int8_gemv_bf16` has its vector path (AVX512_BF16)."""
    return bool(_flag(lib, "dsv2_int8_gemv_bf16_fast"))


def int8_gemv_bf16(lib: ctypes.CDLL, x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x (M,K) bf16 -> (M,N) fp32 = x @ (q·scale)ᵀ, by bf16 dot products on the weight's nibbles."""
    if x.dtype != torch.bfloat16:
        raise TypeError(f"int8_gemv_bf16 takes bf16 activations, got {x.dtype}")
    x, q, scale = x.contiguous(), q.contiguous(), scale.contiguous()
    m, k = x.shape
    n = q.shape[0]
    y = torch.empty(m, n, dtype=torch.float32)
    xsum = torch.empty(m, dtype=torch.float32)
    lib.dsv2_int8_gemv_bf16(_ptr(x), _ptr(q), _ptr(scale), _scale_flag(scale), _ptr(xsum), _ptr(y), m, n, k,
                            torch.get_num_threads())
    return y


def bf16_gemv(lib: ctypes.CDLL, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x (M,K) any float dtype -> (M,N) fp32 = x @ wᵀ for a bf16 weight w (N,K)."""
    xc, w = _gemv_input(x), w.contiguous()
    m, k = xc.shape
    n = w.shape[0]
    y = torch.empty(m, n, dtype=torch.float32)
    lib.dsv2_bf16_bgemv(_ptr(xc), int(xc.dtype == torch.bfloat16), 0, _ptr(w), 0, k, _ptr(y), 0, 1, m, n, k,
                        torch.get_num_threads())
    return y


def bf16_bgemv(lib: ctypes.CDLL, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x (B,M,K) any float dtype -> (B,M,N) fp32 = x @ wᵀ per batch, for a bf16 w (B,N,K) whose rows are
    contiguous (stride(-1) == 1; rows and batches may be strided, e.g. the heads of one weight)."""
    if w.stride(-1) != 1:
        raise ValueError(f"bf16_bgemv needs contiguous weight rows, got strides {w.stride()}")
    xc = _gemv_input(x)
    b, m, k = xc.shape
    n = w.shape[1]
    y = torch.empty(b, m, n, dtype=torch.float32)
    lib.dsv2_bf16_bgemv(_ptr(xc), int(xc.dtype == torch.bfloat16), m * k, _ptr(w), w.stride(0), w.stride(1),
                        _ptr(y), m * n, b, m, n, k, torch.get_num_threads())
    return y


def int8_dequant(lib: ctypes.CDLL, q: torch.Tensor, scale: torch.Tensor, r0: int, r1: int,
                 out: torch.Tensor) -> torch.Tensor:
    """Rows [r0, r1) of q·scale into out ((r1-r0), K), fp32 or bf16, contiguous."""
    lib.dsv2_int8_dequant(_ptr(q), _ptr(scale), _scale_flag(scale), _ptr(out), int(out.dtype == torch.bfloat16),
                          r0, r1, q.shape[1], torch.get_num_threads())
    return out


def int4_dequant(lib: ctypes.CDLL, packed: torch.Tensor, sz: torch.Tensor, group_size: int, r0: int, r1: int,
                 out: torch.Tensor) -> torch.Tensor:
    """Rows [r0, r1) of the dequantised (Np, Kp) weight into out ((r1-r0), Kp), fp32 or bf16."""
    np_, kp = packed.shape[0], packed.shape[1] * 2
    lib.dsv2_int4_dequant(_ptr(packed), _ptr(sz), _scale_flag(sz), _ptr(out), int(out.dtype == torch.bfloat16),
                          r0, r1, np_, kp, group_size, torch.get_num_threads())
    return out


def int4_gemv_kind(lib: ctypes.CDLL) -> int:
    """Which vector path this build's int4 GEMV has: 1 AVX512_BF16 + VBMI, 2 AVX2 + FMA (the build for CPUs
    without native bf16), 0 none."""
    return _flag(lib, "dsv2_int4_gemv_fast")


def fast_int4_gemv(lib: ctypes.CDLL) -> bool:
    """Whether this build's `dsv2_int4_gemv` has a vector path (either kind); elsewhere it is a plain loop that
    tests call but the kernels do not."""
    return int4_gemv_kind(lib) != 0


def int4_gemv(lib: ctypes.CDLL, x: torch.Tensor, packed: torch.Tensor, sz: torch.Tensor, group_size: int
              ) -> torch.Tensor:
    """x (M, Kp) bf16 -> (M, Np) fp32 = x @ Wᵀ for the packed int4 weight (Np, Kp/2) with bf16 scales_and_zeros."""
    if x.dtype != torch.bfloat16 or sz.dtype != torch.bfloat16:
        raise TypeError(f"the int4 GEMV takes bf16 activations and scales, got {x.dtype} and {sz.dtype}")
    x, packed, sz = x.contiguous(), packed.contiguous(), sz.contiguous()
    m, kp = x.shape
    np_ = packed.shape[0]
    if packed.shape[1] * 2 != kp:
        raise ValueError(f"activations have {kp} columns, the packed weight {packed.shape[1] * 2}")
    xs = torch.empty(m, kp // group_size, dtype=torch.float32)
    y = torch.empty(m, np_, dtype=torch.float32)
    lib.dsv2_int4_gemv(_ptr(x), _ptr(packed), _ptr(sz), _ptr(xs), _ptr(y), m, np_, kp, group_size,
                       torch.get_num_threads())
    return y


# the int8-activation kernels stream every activation row past each weight row: above this many rows they
# run on row slices, so the slice's codes stay in the cache (2,048 x 10,944 int8 at 2,048 rows, 2 Zen 4 cores
# capped at AVX2: 92 GFLOPS in one call, ~168 at 512 rows)
Q8_CHUNK_ROWS = 512


def fast_q8(lib: ctypes.CDLL) -> bool:
    """Whether this build's int8-activation kernels have their vector path (AVX2); elsewhere they are plain
    loops that tests call but the kernels do not."""
    return bool(_flag(lib, "dsv2_q8_fast"))


def quant_q8(lib: ctypes.CDLL, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (M,K) fp32/bf16 -> (xq (M,K) int8, d (M, ceil(K/32)) fp32): int8 codes per 32 columns, d = amax/127."""
    x = _gemv_input(x)
    m, k = x.shape
    xq = torch.empty(m, k, dtype=torch.int8)
    d = torch.empty(m, -(-k // 32), dtype=torch.float32)
    lib.dsv2_quant_q8(_ptr(x), int(x.dtype == torch.bfloat16), _ptr(xq), _ptr(d), m, k)
    return xq, d


def round_q8(lib: ctypes.CDLL, x: torch.Tensor) -> torch.Tensor:
    """x (M,K) fp32/bf16 -> its rounded copy codes·d (as `quant_q8` rounds it) in x's dtype."""
    x = _gemv_input(x)
    out = torch.empty_like(x)
    lib.dsv2_round_q8(_ptr(x), int(x.dtype == torch.bfloat16), _ptr(out), int(x.dtype == torch.bfloat16),
                      x.shape[0], x.shape[1], torch.get_num_threads())
    return out


def int8_gemv_q8(lib: ctypes.CDLL, x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x (M,K) fp32/bf16 -> (M,N) fp32 = round_q8(x) @ (q·scale)ᵀ by integer dot products."""
    xq, d = quant_q8(lib, x)
    q, scale = q.contiguous(), scale.contiguous()
    m, k = xq.shape
    n = q.shape[0]
    y = torch.empty(m, n, dtype=torch.float32)
    for r0 in range(0, m, Q8_CHUNK_ROWS):
        r1 = min(m, r0 + Q8_CHUNK_ROWS)
        lib.dsv2_int8_gemv_q8(_row(xq, r0), _row(d, r0), _ptr(q), _ptr(scale), _scale_flag(scale),
                              _row(y, r0), r1 - r0, n, k, torch.get_num_threads())
    return y


def int4_gemv_q8(lib: ctypes.CDLL, x: torch.Tensor, packed: torch.Tensor, sz: torch.Tensor, group_size: int
                 ) -> torch.Tensor:
    """x (M, Kp) fp32/bf16 -> (M, Np) fp32 = round_q8(x) @ Wᵀ for the packed int4 weight with bf16
    scales_and_zeros (the zero-point term from the exact x): 4 activation rows at a time past the weight."""
    return _int4_q8(lib, x, packed, sz, group_size, gemm=False)


def int4_gemm_q8(lib: ctypes.CDLL, x: torch.Tensor, packed: torch.Tensor, sz: torch.Tensor, group_size: int
                 ) -> torch.Tensor:
    """`int4_gemv_q8`'s product for many rows: the integer GEMM (codes unpacked into cache-sized panels, 3 x 16
    tiles of vpmaddubsw); the GEMVs where the library has no AVX2 path."""
    return _int4_q8(lib, x, packed, sz, group_size, gemm=True)


def _int4_q8(lib: ctypes.CDLL, x: torch.Tensor, packed: torch.Tensor, sz: torch.Tensor, group_size: int,
             gemm: bool) -> torch.Tensor:
    if sz.dtype != torch.bfloat16:
        raise TypeError(f"the int4 int8-activation kernels take bf16 scales, got {sz.dtype}")
    x, packed, sz = _gemv_input(x), packed.contiguous(), sz.contiguous()
    m, kp = x.shape
    np_ = packed.shape[0]
    if packed.shape[1] * 2 != kp:
        raise ValueError(f"activations have {kp} columns, the packed weight {packed.shape[1] * 2}")
    # the kernel's scratch (x's int8 codes, their scales and x's group sums) in one buffer: per row kp int8,
    # kp/32 + kp/g fp32; 64-byte aligned parts
    cq, cd = -(-m * kp // 64) * 64, -(-m * (kp // 32) * 4 // 64) * 64
    scratch = torch.empty(cq + cd + m * (kp // group_size) * 4, dtype=torch.uint8)
    xq, xs = scratch.data_ptr(), scratch.data_ptr() + cq + cd
    y = torch.empty(m, np_, dtype=torch.float32)
    step = m if gemm else Q8_CHUNK_ROWS  # (the GEMM keeps its own row blocks in the cache)
    fn = lib.dsv2_int4_gemm_q8 if gemm else lib.dsv2_int4_gemv_q8
    bf16, nt = int(x.dtype == torch.bfloat16), torch.get_num_threads()
    for r0 in range(0, m, max(step, 1)):
        r1 = min(m, r0 + step)
        fn(_row(x, r0), bf16, _ptr(packed), _ptr(sz), xq + r0 * kp, xq + cq + r0 * (kp // 32) * 4,
           xs + r0 * (kp // group_size) * 4, _row(y, r0), r1 - r0, np_, kp, group_size, nt)
    return y


def gemm_kind(lib: ctypes.CDLL) -> int:
    """This build's `dsv2_gemm`: 2 its vector path on a CPU without AVX512F (the fastest fp32 GEMM there: the
    callers use it), 1 the vector path beside AVX512F (PyTorch's 512-bit GEMMs are used; tests call it),
    0 a plain loop (tests only)."""
    return _flag(lib, "dsv2_gemm_fast")


_GEMM_BF16, _GEMM_INT8, _GEMM_INT4 = 0, 1, 2


def gemm(lib: ctypes.CDLL, x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """x (M,K) fp32/bf16 -> (M,N) fp32 = x @ wᵀ for a bf16 weight w (N,K), or (x @ qᵀ)·scale for int8 codes w
    with a per-row scale (N,) fp32/bf16: fp32 products and sums on the weight as stored (no fp32 copy)."""
    if (w.dtype == torch.int8) != (scale is not None) or w.dtype not in (torch.int8, torch.bfloat16):
        raise TypeError(f"gemm takes a bf16 weight, or int8 codes with a scale; got {w.dtype} and "
                        f"{'no scale' if scale is None else 'a scale'}")
    if w.shape[1] != x.shape[-1]:
        raise ValueError(f"gemm: activations have {x.shape[-1]} columns, the weight {w.shape[1]}")
    w = w if w.stride(-1) == 1 else w.contiguous()
    scale = None if scale is None else scale.contiguous()
    kind = _GEMM_BF16 if scale is None else _GEMM_INT8
    return _gemm(lib, x, w, kind, w.stride(0), scale, 0, w.shape[0])


def int4_gemm(lib: ctypes.CDLL, x: torch.Tensor, packed: torch.Tensor, sz: torch.Tensor, group_size: int
              ) -> torch.Tensor:
    """x (M, Kp) fp32/bf16 -> (M, Np) fp32 = x @ Wᵀ for the packed int4 weight (Np, Kp/2) with scales_and_zeros
    (Kp/g, Np, 2) fp32/bf16, W dequantised to fp32 a cache-sized block at a time (as `int4_dequant`)."""
    packed, sz = packed.contiguous(), sz.contiguous()
    if packed.shape[1] * 2 != x.shape[-1]:
        raise ValueError(f"activations have {x.shape[-1]} columns, the packed weight {packed.shape[1] * 2}")
    np_ = packed.shape[0]
    return _gemm(lib, x, packed, _GEMM_INT4, np_, sz, group_size, np_)


def _gemm(lib: ctypes.CDLL, x: torch.Tensor, w: torch.Tensor, kind: int, ldw: int, scale: torch.Tensor | None,
          group: int, n: int) -> torch.Tensor:
    x = _gemv_input(x)
    m, k = x.shape
    y = torch.empty(m, n, dtype=torch.float32)
    lib.dsv2_gemm(_ptr(x), int(x.dtype == torch.bfloat16), k, _ptr(w), kind, ldw,
                  None if scale is None else _ptr(scale), 0 if scale is None else _scale_flag(scale), group,
                  _ptr(y), n, m, n, k, torch.get_num_threads())
    return y


def latent_decode_bf16(lib: ctypes.CDLL, q: torch.Tensor, chunks: list[torch.Tensor], c: int,
                       scale: float) -> torch.Tensor:
    """Absorbed MLA attention of one sequence in fp32 over bf16 latent rows: q (H,W) -> (H,C) fp32 =
    softmax(scale · q rowsᵀ) rows[:, :C], the rows given as chunks (n,W) of one pool (unit column stride, one
    row stride for all)."""
    if not chunks:
        raise ValueError("latent_decode_bf16 needs at least one chunk of rows")
    q = q.float().contiguous()
    h, w = q.shape
    ld = chunks[0].stride(0)
    for k in chunks:
        if k.dtype != torch.bfloat16 or k.dim() != 2 or k.shape[1] != w or k.stride(1) != 1 or k.stride(0) != ld:
            raise ValueError(f"latent_decode_bf16: a chunk of {k.dtype} {tuple(k.shape)}, strides {k.stride()}; "
                             f"expected bf16 (n, {w}) rows {ld} elements apart")
    ptrs = (ctypes.c_void_p * len(chunks))(*(k.data_ptr() for k in chunks))
    lens = (ctypes.c_int64 * len(chunks))(*(k.shape[0] for k in chunks))
    out = torch.empty(h, c, dtype=torch.float32)
    lib.dsv2_latent_decode_bf16(_ptr(q), h, w, c, ptrs, lens, len(chunks), ld, scale, _ptr(out),
                                torch.get_num_threads())
    return out


def rms_norm(lib: ctypes.CDLL, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`RMSNorm`'s product in one call: w · cast(x · rsqrt(mean(x²) + eps)), normalised in fp32 and cast to
    x's dtype before the weight, the result in the promoted dtype of x and w. x (..., D) and w (D,) fp32 / bf16;
    x's last dim contiguous."""
    d = x.shape[-1]
    x2 = x.reshape(-1, d)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    w = weight if weight.is_contiguous() else weight.contiguous()
    y = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, w.dtype))
    lib.dsv2_rms_norm(_ptr(x2), int(x.dtype == torch.bfloat16), x2.stride(0), _ptr(w), int(w.dtype == torch.bfloat16),
                      _ptr(y), int(y.dtype == torch.bfloat16), x2.shape[0], d, eps, torch.get_num_threads())
    return y


def rope(lib: ctypes.CDLL, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor | None:
    """`apply_rope` for the shapes attention gives it: x (B, T, R) or (B, T, H, R) fp32 / bf16 with unit stride
    in R, cos / sin fp32 of T rows of R/2 (any leading ones of size 1 or of broadcast heads). None when the
    shapes are other ones (the caller's PyTorch code handles those)."""
    if x.dim() == 3:
        x4 = x[:, :, None]
    elif x.dim() == 4:
        x4 = x
    else:
        return None
    b, t, h, r = x4.shape
    if (b != 1 or x4.stride(-1) != 1 or r % 2 or x.dtype not in (torch.float32, torch.bfloat16)
            or cos.dtype != torch.float32 or sin.dtype != torch.float32):
        return None
    cs, sn = cos.reshape(-1, r // 2), sin.reshape(-1, r // 2)
    if cs.shape[0] != t or sn.shape[0] != t:
        return None
    cs, sn = cs.contiguous(), sn.contiguous()
    out = torch.empty(x.shape, dtype=x.dtype)
    lib.dsv2_rope(_ptr(x4), int(x.dtype == torch.bfloat16), x4.stride(1), x4.stride(2), _ptr(cs), _ptr(sn), _ptr(out),
                  t, h, r)
    return out


def silu_mul(lib: ctypes.CDLL, g: torch.Tensor, u: torch.Tensor) -> torch.Tensor | None:
    """SwiGLU's gating silu(g) · u in one call (fp32 arithmetic, rounded where PyTorch's two ops round), g and u
    of one shape and dtype (fp32 / bf16) with unit stride in the last dim (e.g. the halves of one gate-up
    product); None for other inputs (the caller's PyTorch code handles those)."""
    if (g.shape != u.shape or g.dtype != u.dtype or g.dtype not in (torch.float32, torch.bfloat16) or g.dim() == 0
            or g.stride(-1) != 1 or u.stride(-1) != 1):
        return None
    n = g.shape[-1]
    g2, u2 = g.reshape(-1, n), u.reshape(-1, n)  # views for row-strided halves
    if g2.stride(-1) != 1 or u2.stride(-1) != 1:
        return None
    out = torch.empty(g.shape, dtype=g.dtype)
    lib.dsv2_silu_mul(_ptr(g2), _ptr(u2), int(g.dtype == torch.bfloat16), g2.stride(0), u2.stride(0), _ptr(out),
                      g2.shape[0], n, torch.get_num_threads())
    return out
