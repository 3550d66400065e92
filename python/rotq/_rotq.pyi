"""Type stubs of rotq's Rust extension (``rotq._rotq``). The functions here write into the
arrays they are given; ``rotq``'s Python functions allocate those and are the public API."""

from typing import Any, Optional, Sequence, Tuple, Union

ArrayLike = Any  # an object with __dlpack__: a NumPy array or a torch tensor
Rotation = Union[None, str, ArrayLike]  # "none", "hadamard", "block:B", "randomized:SEED", or [d, d]

__version__: str

class RotqError(Exception):
    """Every error rotq raises."""

class InvalidInputError(RotqError, ValueError):
    """Bad input: a shape, dtype, format, rotation, size, table or parameter."""

class CheckpointError(RotqError, ValueError):
    """A checkpoint's transform config or weights could not be read as rotations."""

class RotqMemoryError(RotqError, MemoryError):
    """A size that overflows or memory that cannot be had."""

class DeviceError(RotqError, RuntimeError):
    """A device (CUDA) failure."""

def formats() -> list[dict[str, Any]]: ...
def row_bytes(format_name: str, dim: int) -> int: ...
def rotate(x: ArrayLike, out: ArrayLike, rotation: Rotation, inverse: bool = False) -> None: ...
def hadamard_transform(x: ArrayLike, out: ArrayLike, scale: float = 1.0, base: int = 1) -> None: ...
def quantize(x: ArrayLike, out: ArrayLike, format_name: str, rotation: Rotation = None) -> None: ...
def dequantize(data: ArrayLike, out: ArrayLike, format_name: str, rotation: Rotation = None) -> None: ...
def checkpoint_plans(
    config_json: str, n_layers: int, head_dim: int, checkpoint_dir: Optional[str] = None
) -> list[dict[str, Any]]: ...
def rotation_disabled() -> bool: ...
def cpu_isa() -> str: ...
def pool_bytes(
    k_format: str, v_format: str, n_kv_heads: int, head_dim: int, v_dim: int, n_pages: int,
    page_tokens: int,
) -> Tuple[int, int]: ...

class AttentionPlan:
    """A batch's attention planned by :meth:`KvPool.plan` (its workspace included)."""

    @property
    def out_shape(self) -> Tuple[int, int, int]: ...
    @property
    def lse_shape(self) -> Tuple[int, int]: ...
    @property
    def workspace_len(self) -> int: ...

class KvPool:
    """One layer's K and V pages over two uint8 arrays (the engine's, or new NumPy ones)."""

    def __init__(
        self, k_format: str, v_format: str, n_kv_heads: int, head_dim: int, v_dim: int,
        n_pages: int, page_tokens: int, k: Optional[ArrayLike] = None,
        v: Optional[ArrayLike] = None, qk_rotation: Rotation = None, v_rotation: Rotation = None,
        query: str = "auto",
    ) -> None:
        """`query`: "auto" (q8_0 queries over rotated q4_0/q8_0 K, else exact), "exact", "q8_0"."""
    @property
    def k(self) -> ArrayLike: ...
    @property
    def v(self) -> ArrayLike: ...
    @property
    def slots(self) -> int: ...
    def position(self, slot: int) -> Optional[int]: ...
    def append(self, k: ArrayLike, v: ArrayLike, slot_mapping: ArrayLike, positions: ArrayLike) -> None: ...
    def shift(
        self, slots: ArrayLike, delta: int, rope_dims: Optional[int] = None,
        freq_base: float = 10000.0, freq_scale: float = 1.0, neox: bool = False,
    ) -> None: ...
    def copy_slots(self, src: ArrayLike, dst: ArrayLike) -> None: ...
    def plan(
        self, query_start_loc: ArrayLike, h_q: int, block_table: Optional[ArrayLike] = None,
        seq_lens: Optional[ArrayLike] = None, indptr: Optional[ArrayLike] = None,
        indices: Optional[ArrayLike] = None, last_page_len: Optional[ArrayLike] = None,
        causal: bool = True, scale: Optional[float] = None, window: Optional[int] = None,
        softcap: Optional[float] = None, q_positions: Optional[ArrayLike] = None,
        mask: Optional[ArrayLike] = None,
    ) -> AttentionPlan: ...
    def run(
        self, plan: AttentionPlan, q: ArrayLike, out: ArrayLike, lse: Optional[ArrayLike] = None
    ) -> None: ...

class RotatedKvCache:
    """One sequence's rotated, quantized cache (one layer) on the CPU."""

    def __init__(
        self, k_format: str, v_format: str, n_heads: int, head_dim: int, v_dim: int,
        capacity: int, qk_rotation: Rotation = None, v_rotation: Rotation = None,
        page_tokens: Optional[int] = None, query: str = "auto",
    ) -> None: ...
    def __len__(self) -> int: ...
    def append(self, k: ArrayLike, v: ArrayLike) -> None: ...
    def attention(
        self, q: ArrayLike, causal: bool = True, pos_offset: Optional[int] = None,
        scale: Optional[float] = None, window: Optional[int] = None,
        softcap: Optional[float] = None,
    ) -> Any: ...

def oracle_hadamard(out: ArrayLike, n: int) -> None: ...
def oracle_rotate(x: ArrayLike, out: ArrayLike, rotation: Rotation, inverse: bool = False) -> None: ...
def oracle_quantize(x: ArrayLike, out: ArrayLike, format_name: str) -> None: ...
def oracle_dequantize(data: ArrayLike, out: ArrayLike, format_name: str) -> None: ...
def oracle_attention(
    q: ArrayLike, k: ArrayLike, v: ArrayLike, out: ArrayLike, lse: ArrayLike,
    causal: bool = False, pos_offset: int = 0, scale: Optional[float] = None,
    window: Optional[int] = None, softcap: Optional[float] = None, mask: Optional[ArrayLike] = None,
) -> None: ...
def oracle_rotated_quantized_attention(
    q: ArrayLike, k: ArrayLike, v: ArrayLike, out: ArrayLike, k_format: str, v_format: str,
    qk_rotation: Rotation = None, v_rotation: Rotation = None, causal: bool = False,
    pos_offset: int = 0, scale: Optional[float] = None, window: Optional[int] = None,
    softcap: Optional[float] = None,
) -> None: ...

# The CUDA side (the wheel's `cuda` feature): torch CUDA tensors, queued on the stream whose
# raw handle is `stream` (``torch.cuda.current_stream().cuda_stream``); ``rotq.ops`` calls them.
def cuda_available() -> bool: ...
def cuda_rotate_(
    x: ArrayLike, rotation: str, inverse: bool, stream: int, output_scale: Optional[float] = None,
) -> None: ...
def cuda_quantize(
    x: ArrayLike, out: ArrayLike, format_name: str, rotation: str, slots: ArrayLike, stream: int,
) -> None: ...
def cuda_dequantize(
    data: ArrayLike, out: ArrayLike, format_name: str, rotation: str, stream: int,
) -> None: ...

class CudaPool:
    def __init__(
        self, k_format: str, v_format: str, n_kv_heads: int, head_dim: int, v_dim: int,
        n_pages: int, page_tokens: int, qk_rotation: str, v_rotation: str, device: int,
    ) -> None: ...
    @property
    def cached_plans(self) -> int: ...
    def append(
        self, k_pool: ArrayLike, v_pool: ArrayLike, k: ArrayLike, v: ArrayLike,
        slot_mapping: ArrayLike, stream: int,
    ) -> None: ...
    def workspace_bytes(
        self, dtype: str, seqs: int, max_rows: int, max_seq_len: int, h_q: int, max_blocks: int,
        mask_stride: int = 0,
    ) -> int: ...
    def run(
        self, q: ArrayLike, k_pool: ArrayLike, v_pool: ArrayLike, query_start_loc: ArrayLike,
        block_table: ArrayLike, seq_lens: ArrayLike, workspace: ArrayLike, out: ArrayLike,
        max_seq_len: int, stream: int, mask: Optional[ArrayLike] = None,
    ) -> None: ...
