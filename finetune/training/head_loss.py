"""A causal LM's training loss without a logits tensor: the output layer and the cross-entropy run over the target
positions in chunks of CHUNK rows, and each chunk's gradient is computed on the spot, so memory holds one chunk's
float32 logits instead of (targets x vocabulary) logits, their float32 copy and the saved log-softmax.

The model's forward still goes through every wrapper (DDP, peft) and hands back its final hidden states; one target
position is selected with `logits_to_keep`, so the model computes those logits itself, and the first time a model
is seen they must equal what its plain output layer gives from the hidden state. That proves the model applies
nothing after the output layer (no soft-capping, no logit scale). Models that do, or whose output layer is not a
plain nn.Linear (LoRA on lm_head; peft's trained copy of a modules_to_save lm_head is one), get None here and take
the logits path in finetune.training.loss."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any
from weakref import WeakKeyDictionary

if TYPE_CHECKING:
    import torch

CHUNK = 256  # target rows per chunk: 256 x 49,152 float32 logits = 50 MB
IGNORE = -100
_PLAIN: WeakKeyDictionary[Any, bool] = WeakKeyDictionary()  # model -> its logits are its plain output layer's


def chunked_loss_sum(model: Any, inner: Any, inputs: dict[str, Any], labels: torch.Tensor) -> torch.Tensor | None:
    """Summed cross-entropy over the targets of `labels` (next-token, -100 ignored), or None where this path does
    not apply. `inner` is the transformers model inside `model`'s wrappers."""
    import torch
    import torch.nn.functional as F

    head = _linear_params(inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None)
    keep = F.pad(labels[:, 1:] != IGNORE, (0, 1), value=False)
    if head is None or _PLAIN.get(inner) is False or not bool(keep.any()):
        return None
    weight, bias = head
    probe = torch.zeros_like(keep)
    probe.view(-1)[int(keep.view(-1).nonzero()[0])] = True
    out = model(**inputs, logits_to_keep=probe, output_hidden_states=True, use_cache=False)
    if out.logits.dim() != 2 or not out.hidden_states:
        _PLAIN[inner] = False
        return None
    hidden = out.hidden_states[-1][keep]
    if inner not in _PLAIN:
        _PLAIN[inner] = _same_logits(F.linear(hidden[:1].detach(), weight, bias), out.logits)
        if not _PLAIN[inner]:
            return None
    return _head_loss(hidden, weight, bias, labels[:, 1:][keep[:, :-1]])  # type: ignore[no-any-return]


def _linear_params(head: Any) -> tuple[Any, Any] | None:
    """(weight, bias) of a plain nn.Linear output layer, or of the trained copy peft keeps for modules_to_save. Not
    of a LoRA-wrapped one: its extra term is zero at the start, so the probe could not tell."""
    import torch

    if type(head) is torch.nn.Linear:
        return head.weight, head.bias
    copies, active = getattr(head, "modules_to_save", None), getattr(head, "active_adapters", None)
    if isinstance(copies, torch.nn.ModuleDict) and active and not getattr(head, "disable_adapters", True):
        copy = copies[active[0]] if active[0] in copies else None  # noqa: SIM401 (ModuleDict has no get)
        if type(copy) is torch.nn.Linear:
            return copy.weight, copy.bias
    return None


def _same_logits(mine: torch.Tensor, model_logits: torch.Tensor) -> bool:
    """Equal up to half-precision rounding: soft-capping or a logit scale moves the large logits far more."""
    mine, theirs = mine.float(), model_logits.detach().float()
    return bool((mine - theirs).abs().max() <= 1e-2 * max(1.0, float(theirs.abs().max())))


def _chunk_grads(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed loss, dloss/dlogits) of one chunk; the gradient is written over the float32 logits."""
    import torch

    wide = logits.to(torch.promote_types(logits.dtype, torch.float32))  # half precision up; float64 (tests) kept
    lse = torch.logsumexp(wide, dim=-1)
    loss = (lse - wide.gather(1, targets[:, None]).squeeze(1)).sum()
    grad = wide.sub_(lse[:, None]).exp_()  # softmax
    grad[torch.arange(len(targets), device=grad.device), targets] -= 1
    return loss, grad


def _head_loss(hidden: Any, weight: Any, bias: Any, targets: Any) -> Any:
    return _function().apply(hidden, weight, bias, targets)


_FUNCTION: list[Any] = []


def _function() -> Any:
    """The autograd function, built on first use (torch is imported inside functions only)."""
    if not _FUNCTION:
        import torch

        class HeadLoss(torch.autograd.Function):
            """sum over rows of cross_entropy(hidden @ weight.T + bias, targets); the gradients come out of forward."""

            @staticmethod
            def forward(ctx: Any, hidden: Any, weight: Any, bias: Any, targets: Any) -> Any:
                grads = _forward_chunks(hidden, weight, bias, targets, ctx.needs_input_grad[:3])
                ctx.save_for_backward(*grads[1:])
                return grads[0]

            @staticmethod
            def backward(ctx: Any, grad_out: Any) -> tuple[Any, ...]:
                scaled = [None if g is None else g * grad_out.to(g.dtype) for g in ctx.saved_tensors]
                return (*scaled, None)

        _FUNCTION.append(HeadLoss)
    return _FUNCTION[0]


def _forward_chunks(hidden: Any, weight: Any, bias: Any, targets: Any, needs: tuple[bool, ...]) -> tuple[Any, ...]:
    """(loss, d/dhidden, d/dweight, d/dbias), one chunk of rows at a time; gradients only where needed."""
    import torch
    import torch.nn.functional as F

    grad_h = torch.empty_like(hidden) if needs[0] else None
    grad_w = torch.zeros_like(weight, dtype=torch.promote_types(weight.dtype, torch.float32)) if needs[1] else None
    grad_b = torch.zeros_like(bias, dtype=torch.promote_types(bias.dtype, torch.float32)) if needs[2] else None
    total = hidden.new_zeros((), dtype=torch.promote_types(hidden.dtype, torch.float32))
    cast: dict[Any, Any] = {}  # the weight in the gradient's dtype, copied once (fp32 weights under autocast)
    for start in range(0, len(hidden), CHUNK):
        h = hidden[start: start + CHUNK]
        logits = F.linear(h, weight, bias)  # under autocast: bf16, as the model's own output layer computes them
        loss, grad = _chunk_grads(logits, targets[start: start + CHUNK])
        total += loss
        grad = grad.to(logits.dtype)  # the plain path casts the float32 gradient back the same way
        if grad_h is not None:
            w = cast.setdefault(grad.dtype, weight.to(grad.dtype))
            grad_h[start: start + CHUNK] = (grad @ w).to(hidden.dtype)
        if grad_w is not None:
            grad_w += (grad.T @ h.to(grad.dtype)).to(grad_w.dtype)
        if grad_b is not None:
            grad_b += grad.sum(0).to(grad_b.dtype)
    return (total, grad_h, None if grad_w is None else grad_w.to(weight.dtype),
            None if grad_b is None else grad_b.to(bias.dtype))
