"""Second-order inner steps that keep no graph: the outer backward rebuilds one step at a time.

Exact second-order MAML keeps, for every inner step, the activations of the support forward and
of its create_graph backward until the outer backward has differentiated through that step, so
memory grows with `inner_steps`. With `algo.checkpoint_inner_steps=true` each step runs without
a graph and stores only its inputs (the adapted weights, which second order keeps anyway); the
outer backward replays the step with the same dropout draws, autocast and attention kernel,
builds its graph, takes the vector-Jacobian product and frees it before the previous step.
The meta-gradient is the same; the cost is one more forward and backward per step.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from metarun.backbone import second_order_attention

# run(inputs, create_graph) -> (the step's outputs, its support loss)
StepFn = Callable[[dict[str, torch.Tensor], bool], tuple[dict[str, torch.Tensor], torch.Tensor]]


def checkpointed_step(
    run: StepFn, inputs: dict[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """`run(inputs)` whose outputs are differentiable functions of `inputs` (second order),
    without keeping the step's graph in memory."""
    keys = list(inputs)
    out_keys: list[str] = []  # filled by forward: outputs may add keys (inner Adam state)
    values = _RecomputedStep.apply(run, keys, out_keys, *inputs.values())
    *outs, loss = values
    return dict(zip(out_keys, outs, strict=True)), loss


def _detached(keys: list[str], values) -> dict[str, torch.Tensor]:
    """Fresh leaves of the step's inputs: the step's graph starts at them."""
    pairs = zip(keys, values, strict=True)
    return {k: v.detach().requires_grad_(v.requires_grad) for k, v in pairs}


class _RecomputedStep(torch.autograd.Function):
    @staticmethod
    def forward(ctx, run: StepFn, keys: list[str], out_keys: list[str], *values: torch.Tensor):
        device = values[0].device
        ctx.run, ctx.keys, ctx.out_keys, ctx.device = run, keys, out_keys, device
        ctx.cpu_rng = torch.get_rng_state()
        ctx.cuda_rng = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        ctx.autocast = (torch.is_autocast_enabled(device.type),
                        torch.get_autocast_dtype(device.type))  # fmt: skip
        ctx.save_for_backward(*values)
        with torch.enable_grad():
            inputs = _detached(keys, values)
            new, loss = run(inputs, False)
        out_keys.extend(new)
        # An output that is an input unchanged (no gradient reached it) must be a new tensor.
        outs = [v.detach().clone() if v is inputs.get(k) else v.detach() for k, v in new.items()]
        loss = loss.detach()  # the step's graph is released here
        ctx.mark_non_differentiable(loss)
        # An output no later step reads (the pooler, say) gets None, not zeros: its weights
        # then get no gradient, as without checkpointing, and the optimizer skips them.
        ctx.set_materialize_grads(False)
        return (*outs, loss)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):
        *grads, _ = grads  # the support loss is reported, not differentiated
        device, (enabled, dtype) = ctx.device, ctx.autocast
        devices = [device] if ctx.cuda_rng is not None else []
        with (
            torch.random.fork_rng(devices=devices),
            torch.enable_grad(),
            torch.autocast(device.type, dtype=dtype, enabled=enabled),
            second_order_attention(),
        ):
            torch.set_rng_state(ctx.cpu_rng)  # the same dropout draws as the forward
            if ctx.cuda_rng is not None:
                torch.cuda.set_rng_state(ctx.cuda_rng, device)
            inputs = _detached(ctx.keys, ctx.saved_tensors)
            new, _ = ctx.run(inputs, True)
            pairs = [(new[k], g) for k, g in zip(ctx.out_keys, grads, strict=True)
                     if g is not None and new[k].requires_grad]  # fmt: skip
            wrt = [k for k in ctx.keys if inputs[k].requires_grad]
            if not pairs or not wrt:
                return (None, None, None, *(None for _ in ctx.keys))
            found = torch.autograd.grad(
                [o for o, _ in pairs], [inputs[k] for k in wrt], [g for _, g in pairs],
                allow_unused=True,
            )  # fmt: skip
        by_key = dict(zip(wrt, found, strict=True))
        return (None, None, None, *(by_key.get(k) for k in ctx.keys))
