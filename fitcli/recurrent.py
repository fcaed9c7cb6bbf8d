"""Recurrent layers (``nn.RNN``, ``nn.LSTM``, ``nn.GRU``): every layer and direction is an
auditable layer whose unit is a hidden unit.

- Its weights are its rows across the gates of ``weight_ih`` and ``weight_hh``.
- Its activation is its hidden state at every time step ([batch, steps, hidden]; observations are
  steps). The fused kernels return only the last layer's states, so while tapped the module runs
  layer by layer and direction by direction, each with the fused kernel (``torch._VF``), on the
  module's own parameters.
- Exact ablation: when a callback changes a unit's states (zero or mean ablation), that layer and
  direction is unrolled step by step with the unit held at its ablated value at every step, so the
  recurrence feeds back the ablated state too.

While a tap is active, the module's ``forward`` is replaced on the instance and put back after;
parameters are never copied or changed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

RECURRENT_TYPES: tuple[type[nn.Module], ...] = (nn.RNN, nn.LSTM, nn.GRU)


def gates(mod: nn.Module) -> int:
    return 4 if isinstance(mod, nn.LSTM) else 3 if isinstance(mod, nn.GRU) else 1


def suffixes(mod: nn.Module) -> list[tuple[int, int, str]]:
    """(layer, direction, parameter suffix) for every layer and direction."""
    dirs = 2 if mod.bidirectional else 1
    return [(k, d, f"_l{k}" + ("_reverse" if d else "")) for k in range(mod.num_layers) for d in range(dirs)]


def layer_name(module_name: str, suffix: str) -> str:
    return f"{module_name}.{suffix.lstrip('_')}"  # lstm.l0, lstm.l1_reverse


def supported(mod: nn.Module) -> str | None:
    """Why this recurrent module cannot be audited, or None."""
    if getattr(mod, "proj_size", 0):
        return "LSTM with proj_size: not supported yet"
    return None


def _params(mod: nn.Module, sfx: str) -> list[torch.Tensor]:
    ps = [getattr(mod, f"weight_ih{sfx}"), getattr(mod, f"weight_hh{sfx}")]
    if mod.bias:
        ps += [getattr(mod, f"bias_ih{sfx}"), getattr(mod, f"bias_hh{sfx}")]
    return ps


def _fused(mod: nn.Module, x: torch.Tensor, hx: Any, params: list[torch.Tensor]) -> tuple[torch.Tensor, Any]:
    """One layer, one direction, with the fused kernel. ``x``: [batch, steps, in]."""
    from torch import _VF

    if isinstance(mod, nn.LSTM):
        out, h, c = _VF.lstm(x, hx, params, mod.bias, 1, 0.0, False, False, True)
        return out, (h, c)
    if isinstance(mod, nn.GRU):
        out, h = _VF.gru(x, hx, params, mod.bias, 1, 0.0, False, False, True)
        return out, h
    fn = _VF.rnn_tanh if mod.nonlinearity == "tanh" else _VF.rnn_relu
    out, h = fn(x, hx, params, mod.bias, 1, 0.0, False, False, True)
    return out, h


def _cell(mod: nn.Module, x_t: torch.Tensor, state: Any, params: list[torch.Tensor]) -> tuple[torch.Tensor, Any]:
    """One time step (PyTorch's formulas)."""
    w_ih, w_hh = params[0], params[1]
    b_ih, b_hh = (params[2], params[3]) if len(params) == 4 else (None, None)
    h = state[0] if isinstance(mod, nn.LSTM) else state
    gi = nn.functional.linear(x_t, w_ih, b_ih)
    gh = nn.functional.linear(h, w_hh, b_hh)
    if isinstance(mod, nn.LSTM):
        i, f, g, o = (gi + gh).chunk(4, dim=1)
        c = torch.sigmoid(f) * state[1] + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        return h, (h, c)
    if isinstance(mod, nn.GRU):
        ri, zi, ni = gi.chunk(3, dim=1)
        rh, zh, nh = gh.chunk(3, dim=1)
        r, z = torch.sigmoid(ri + rh), torch.sigmoid(zi + zh)
        n = torch.tanh(ni + r * nh)
        h = (1 - z) * n + z * h
        return h, h
    h = torch.tanh(gi + gh) if mod.nonlinearity == "tanh" else torch.relu(gi + gh)
    return h, h


def _unrolled(mod: nn.Module, x: torch.Tensor, hx: Any, params: list[torch.Tensor], reverse: bool,
              held: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, Any]:
    """Step by step; where ``held`` ([batch, hidden] bool) the hidden state is ``values[:, t]`` at
    every step t, and that is what the next step receives."""
    steps = range(x.shape[1] - 1, -1, -1) if reverse else range(x.shape[1])
    state = (hx[0][0], hx[1][0]) if isinstance(mod, nn.LSTM) else hx[0]
    outs: list[torch.Tensor] = [None] * x.shape[1]  # type: ignore[list-item]
    for t in steps:
        h, state = _cell(mod, x[:, t], state, params)
        h = torch.where(held, values[:, t], h)
        state = (h, state[1]) if isinstance(mod, nn.LSTM) else h
        outs[t] = h
    final = (state[0].unsqueeze(0), state[1].unsqueeze(0)) if isinstance(mod, nn.LSTM) else state.unsqueeze(0)
    return torch.stack(outs, dim=1), final


def _hx_for(mod: nn.Module, hx: Any, idx: int, batch: int, ref: torch.Tensor) -> Any:
    def zeros() -> torch.Tensor:
        return torch.zeros(1, batch, mod.hidden_size, dtype=ref.dtype, device=ref.device)

    if hx is None:
        return (zeros(), zeros()) if isinstance(mod, nn.LSTM) else zeros()
    if isinstance(mod, nn.LSTM):
        return hx[0][idx : idx + 1], hx[1][idx : idx + 1]
    return hx[idx : idx + 1]


def tapped_forward(mod: nn.Module, names: dict[str, str], callbacks: dict[str, Callable[[torch.Tensor], torch.Tensor]]):
    """A forward for ``mod`` that hands each tapped layer's hidden states ([batch, steps, hidden])
    to its callback, and unrolls a layer whose states the callback changed."""
    def forward(input: Any, hx: Any = None) -> Any:
        if isinstance(input, nn.utils.rnn.PackedSequence):
            from fitcli.errors import InputError

            raise InputError(f"recurrent layer {type(mod).__name__} got a PackedSequence: padded batches "
                             "(with an attention mask) are supported, packed sequences not yet")
        unbatched = input.dim() == 2
        x = input.unsqueeze(0 if mod.batch_first else 1) if unbatched else input
        if not mod.batch_first:
            x = x.transpose(0, 1)
        batch = x.shape[0]
        finals_h, finals_c = [], []
        dirs = 2 if mod.bidirectional else 1
        for k in range(mod.num_layers):
            outs = []
            for d in range(dirs):
                sfx = f"_l{k}" + ("_reverse" if d else "")
                params = _params(mod, sfx)
                h0 = _hx_for(mod, hx if not unbatched or hx is None else _batch_hx(mod, hx), k * dirs + d, batch, x)
                xin = x.flip(1) if d else x
                out, fin = _fused(mod, xin, h0, params)
                out = out.flip(1) if d else out
                cb = callbacks.get(names[sfx])
                if cb is not None:
                    new = cb(out)
                    if new is not out:
                        held = (new != out).any(dim=1)  # [batch, hidden]: the (sample, unit) pairs ablated
                        if bool(held.any()):
                            out, fin = _unrolled(mod, x, h0, params, bool(d), held, new)
                            out = torch.where(held.unsqueeze(1), new, out)
                        else:
                            out = new
                outs.append(out)
                if isinstance(mod, nn.LSTM):
                    finals_h.append(fin[0])
                    finals_c.append(fin[1])
                else:
                    finals_h.append(fin)
            x = torch.cat(outs, dim=2) if dirs == 2 else outs[0]
        out = x if mod.batch_first else x.transpose(0, 1)
        h_n = torch.cat(finals_h, dim=0)
        if unbatched:
            out = out.squeeze(0 if mod.batch_first else 1)
            h_n = h_n.squeeze(1)
        if isinstance(mod, nn.LSTM):
            c_n = torch.cat(finals_c, dim=0)
            return out, (h_n, c_n.squeeze(1) if unbatched else c_n)
        return out, h_n
    return forward


def _batch_hx(mod: nn.Module, hx: Any) -> Any:
    if isinstance(mod, nn.LSTM):
        return hx[0].unsqueeze(1), hx[1].unsqueeze(1)
    return hx.unsqueeze(1)


@contextlib.contextmanager
def tap(modules: dict[str, nn.Module], layers: dict[str, tuple[str, str]],
        callbacks: dict[str, Callable[[torch.Tensor], torch.Tensor]]) -> Iterator[None]:
    """``layers``: layer name -> (module name, parameter suffix). Patches the forward of each
    recurrent module with a tapped layer; always put back."""
    by_module: dict[str, dict[str, str]] = {}
    for name in callbacks:
        mname, sfx = layers[name]
        by_module.setdefault(mname, {})
    for mname in by_module:
        by_module[mname] = {sfx: name for name, (m, sfx) in layers.items() if m == mname}
    patched = []
    try:
        for mname, names in by_module.items():
            mod = modules[mname]
            had = "forward" in mod.__dict__
            old = mod.__dict__.get("forward")
            mod.forward = tapped_forward(mod, names, {n: callbacks[n] for n in names.values() if n in callbacks})
            patched.append((mod, had, old))
        yield
    finally:
        for mod, had, old in patched:
            if had:
                mod.forward = old
            else:
                del mod.forward
