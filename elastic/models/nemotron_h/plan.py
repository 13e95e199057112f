"""NemotronH's training-memory and FLOP model: the family facts `elastic.plan` asks for.

`elastic.plan` models the training step (weights, optimizer, teacher, loss chunks, the step's
moments) for any family; what one block keeps and needs depends on the family's modules and is
answered here, read off transformers' NemotronH (5.x) modules under bf16 autocast:

* `saved_per_token`: what autograd keeps per token for one block of a layer kind (``M`` Mamba-2,
  ``-`` MLP, ``*`` attention), for the scan path that runs (``kernel``: mamba-ssm's fused scan,
  ``torch``: transformers' ``mamba2_chunk_scan``) and for the elastic (masked) model of the search.
* `workspace` / `inference_workspace`: the transient bytes of one Mamba layer's scan beyond what it
  keeps; `layer_transient`: one block's outputs and widest intermediate.
* `matmul_params` and `mixer_flops_per_token`: the FLOP model.
* `sizes`: the parent's sizes from its config alone (the students come from `elastic.plan`, generic).

`tests/test_plan.py` checks the resulting peak against fake-tensor traces of the project's own steps.
"""

from __future__ import annotations

from elastic.arch import ArchError
import elastic.models.nemotron_h.kernels as kernels
from elastic.models.nemotron_h.sizes import Sizes as Arch

SIZES = Arch  # the sizes type this model reads
FP32, BF16 = 4, 2
DEFAULT_CHUNK = 128  # transformers' NemotronH default scan chunk (config.chunk_size)
KINDS = "M-*"  # the layer kinds the model below knows: Mamba-2, MLP, attention
WORKSPACE_NOTE = "{path} path: one Mamba layer's scan workspace"
INFERENCE_WORKSPACE_NOTE = "{path} path: one layer's scan workspace (no grad: segment sum, L, G and M in fp32)"


def sizes(config: dict) -> Arch:
    """The sizes type of a parent `config.json` dict."""
    return Arch.from_config(config)


def chunk(config: dict) -> int:
    """The Mamba-2 scan's chunk length ``Q`` (its workspace grows with ``Q``)."""
    return int(config.get("chunk_size") or config.get("mamba_chunk_size") or DEFAULT_CHUNK)


def detected_path() -> str:
    """``kernel`` when mamba-ssm's fused kernels import here, else ``torch``."""
    return kernels.path()


def _mamba_dims(a: Arch) -> tuple[int, int, int, int, int]:
    return a.mamba_intermediate, a.conv_dim, a.mamba_num_heads, a.ssm_state_size, a.mamba_head_dim


def saved_per_token(a: Arch, kind: str, *, residual: int, path: str, elastic: bool, chunk: int) -> float:
    """Bytes autograd keeps per token for one block of `kind` in a bf16-autocast training forward.

    Read off transformers' NemotronH (5.x) modules under autocast (matmuls and einsums in bf16, each
    casting its inputs; element-wise ops in their input dtype):

    * block RMSNorm: fp32 residual (fp32 weights): its input and normalised output (fp32), and one bf16
      copy of the output per linear that reads it (autocast casts per op: 1 for Mamba / MLP, 3 for
      q/k/v); bf16 residual (FSDP bf16 weights): an fp32 copy, the normalised output and the bf16 output.
    * MLP: relu(up) and its square (bf16). Attention: q, k, v, the output and o_proj's input (bf16),
      sdpa's log-sum-exp (flash / memory-efficient kernels: no S x S matrix).
    * Mamba, torch path (``mamba2_chunk_scan``): the conv's bf16 input and output; x in fp32 and x * dt;
      bf16 copies of x, B, C, B * decay and the chunk states for the einsums; one fp32 B or C repeated to
      every head; ``L = exp(segsum)`` fp32 ``[H, Q]`` per token and the bf16 ``G = C.B`` and ``M = G * L``;
      the gated RMSNorm's five fp32 tensors and out_proj's bf16 input.
    * Mamba, fused kernel (mamba-ssm ``mamba_split_conv1d_scan_combined``): ``in_proj``'s output
      ``[z|xBC|dt]`` and the scan output (bf16); the kernel recomputes the rest in backward. The elastic
      model (search) cannot use the fused kernel (its gated norm is masked): transformers' unfused path
      with mamba-ssm's chunk scan keeps ``[z|xBC|dt]``, the conv output, the scan output and the torch
      gated norm.
    * elastic masks (search): each masked RMSNorm keeps its scale (fp32), the depth gate keeps
      ``block(x) - x`` (fp32), the MLP keeps its masked activation, the gated norm its scale.
    """
    h = a.hidden_size
    readers = 3 if kind == "*" else 1
    norm = (FP32 * h * 2 + BF16 * h * readers) if residual == FP32 else (FP32 * h * 2 + BF16 * h)
    if elastic:
        norm += FP32 * h * 2
    if kind == "-":
        f = a.intermediate_size
        return norm + BF16 * f * 2 + (BF16 * f if elastic else 0)
    if kind == "*":
        q = a.num_attention_heads * a.head_dim
        kv = a.num_key_value_heads * a.head_dim
        return norm + BF16 * (2 * q + 2 * kv) + FP32 * a.num_attention_heads
    if kind == "M":
        i, cd, nh, n, p = _mamba_dims(a)
        zxbcdt = BF16 * (i + cd + nh)
        small = FP32 * nh * 4
        if path == "kernel" and not elastic:
            return norm + zxbcdt + BF16 * i + small
        gated = FP32 * i * 5 + BF16 * i + (FP32 * i if elastic else 0)
        if path == "kernel":
            return norm + zxbcdt + BF16 * cd + BF16 * i + gated + small
        # conv input: autocast's bf16 copy (fp32 weights), or the [z|xBC|dt] view itself (bf16 weights)
        conv = (BF16 * cd if residual == FP32 else zxbcdt) + BF16 * cd
        hn = nh * n
        scan = (FP32 * i * 2 + BF16 * i * 3 + FP32 * hn + BF16 * hn * 4 + BF16 * nh * p * n / chunk * 2.5
                + FP32 * nh * chunk + BF16 * nh * chunk * 2)
        return norm + conv + scan + gated + small
    raise ArchError(f"unsupported layer kind {kind!r}")


def _scan_unit(a: Arch, chunk: int) -> int:
    """Bytes per token of one fp32 ``[H, S/Q, Q, Q]`` segment-sum-shaped tensor (torch path)."""
    return FP32 * a.mamba_num_heads * chunk


def workspace(a: Arch, tokens: int, chunk: int, path: str, backward: bool) -> float:
    """Transient bytes of one Mamba layer's scan beyond what it keeps (one layer runs at a time).

    torch path: ``segment_sum`` holds two fp32 ``[B, H, S/Q, Q, Q]`` tensors at once (masked copy and
    cumsum) next to the fp32 B/C repeated to every head; its backward the gradients of ``M`` / ``G`` (bf16),
    of ``L`` and of exp's input (fp32) and the cumsum's backward over the segment sums: 2.75 such tensors at
    once, as the plan's rehearsal measured (`elastic.rehearse`: one 4B-wide Mamba layer at 49K tokens,
    51.7 GiB of backward transient; 1.5 tensors, the count before, left it 5.7 GiB short). kernel path: the fp32 chunk states
    ``[B, S/Q, H, P, N]`` (in and out) and the per-chunk dt / dA cumsums; in backward also the gradient of
    ``[z|xBC|dt]``.
    """
    if "M" not in a.pattern:
        return 0.0
    t = tokens
    i, cd, nh, n, p = _mamba_dims(a)
    if path == "torch":
        unit = _scan_unit(a, chunk)
        return t * (2.75 * unit if backward else 2 * unit + FP32 * nh * n)
    return t * (FP32 * nh * p * n / chunk * (3 if backward else 1) + FP32 * nh * 4 + (BF16 * (i + cd + nh) if backward else 0))


def inference_workspace(a: Arch, tokens: int, chunk: int, path: str) -> float:
    """One Mamba layer's scan without autograd (importance scoring): on the torch path the segment sum,
    ``L``, ``G`` and ``M`` in fp32 at once."""
    if path == "torch":
        return tokens * (3 * _scan_unit(a, chunk) + FP32 * a.mamba_num_heads * a.ssm_state_size)
    return workspace(a, tokens, chunk, path, backward=False)


def layer_transient(a: Arch, kind: str, tokens: int, backward: bool) -> float:
    """The largest non-scan transient of one block: its output (fp32 residual) and widest intermediate;
    in backward their gradients as well."""
    width = {"-": a.intermediate_size, "M": a.mamba_intermediate + a.conv_dim + a.mamba_num_heads,
             "*": (a.num_attention_heads + 2 * a.num_key_value_heads) * a.head_dim}[kind]
    return tokens * (FP32 * a.hidden_size * 2 + BF16 * width * (3 if backward else 1))


def matmul_params(a: Arch) -> int:
    """Parameters used in matrix products per token: every weight but the embedding lookup and the
    norms' vectors (one RMSNorm per block and the final one)."""
    return a.num_params() - a.vocab_size * a.hidden_size - a.hidden_size * (1 + a.num_layers)


def mixer_flops_per_token(a: Arch, seq: int, chunk: int) -> float:
    """Forward FLOPs per token beyond the weight matmuls: causal attention (q.k and p.v over half the
    context on average) and the Mamba-2 SSD scan (intra-chunk C.B and M.x, chunk states in and out)."""
    attn = a.count("*") * 2 * 2 * a.num_attention_heads * a.head_dim * (seq / 2)
    i, cd, nh, n, p = _mamba_dims(a)
    scan = a.count("M") * (2 * nh * chunk * n + 2 * nh * chunk * p + 4 * nh * p * n)
    return attn + scan
