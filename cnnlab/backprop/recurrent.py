"""Recurrent layers and backpropagation through time (BPTT), by hand.

`RNN` and `LSTM` read each image row by row with a one-layer recurrent net and
output its last hidden state, as `cnnlab.models.recurrent.RowReader` does with
nn.RNN and nn.LSTM: x (N, C, H, W) is the sequence x_1 .. x_T of its T = H rows,
each (N, D) with D = C*W.

BPTT is the chain rule on the network unrolled over time: the forward pass
keeps every step's state, the backward pass walks the steps in reverse,
handing dL/dh (and, in the LSTM, dL/dc) from step t to step t-1, and every
step adds to the same weights' gradients. docs/backprop.md derives it.

Speed: only the recurrence itself is sequential. The input's share of every
step's pre-activation (x_t W_ih^T + b) is one matrix product over all T steps
before the loop, and the weight gradients are one product each after the
backward loop, over the per-step gradients the loop stored; derivatives that
depend only on the forward's values are computed for all steps at once. The
loops are left with one small matrix product per step and a few element-wise
operations written into preallocated buffers.
"""

from __future__ import annotations

import torch
from torch import nn

from cnnlab.backprop.layer import Layer
from cnnlab.errors import CnnlabError

WEIGHTS = ("weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0")  # nn.RNN's and nn.LSTM's names


class Recurrent(Layer):
    """What RNN and LSTM share: the weights, the images as rows, the products over all steps.

    Parameters are named as in the model's state_dict ("rnn.weight_ih_l0"): w_ih (G, D),
    w_hh (G, H), b_ih and b_hh (G,), with G = H for the RNN and 4H (gates i, f, g, o) for
    the LSTM, H the hidden size.
    """

    def __init__(self, w_ih: torch.Tensor, w_hh: torch.Tensor, b_ih: torch.Tensor, b_hh: torch.Tensor,
                 path: str = "") -> None:  # fmt: skip
        super().__init__(path)
        self.params.update({f"rnn.{name}": w for name, w in zip(WEIGHTS, (w_ih, w_hh, b_ih, b_hh))})
        self.hidden = w_hh.shape[1]

    @classmethod
    def from_torch(cls, module: nn.Module, path: str) -> Recurrent:
        """From a cnnlab.models.recurrent.RowReader around a one-layer, batch-first nn.RNN (tanh) or nn.LSTM."""
        rnn = module.rnn
        unsupported = [what for what, present in [
            ("more than one layer", rnn.num_layers != 1), ("two directions", rnn.bidirectional),
            ("time-major input", not rnn.batch_first), ("no biases", not rnn.bias),
            ("a projection", getattr(rnn, "proj_size", 0) > 0),
            ("a relu nonlinearity", getattr(rnn, "nonlinearity", "tanh") != "tanh"),
        ] if present]  # fmt: skip
        if unsupported:
            raise CnnlabError(f"cnnlab's backprop has no hand-written {type(rnn).__name__} with "
                              f"{', '.join(unsupported)} (module '{path}'): use --engine autograd")  # fmt: skip
        return cls(*(getattr(rnn, name).detach() for name in WEIGHTS), path)

    def _input_products(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (N, C, H, W) -> (its rows, time-major (T*N, D); x_t W_ih^T + b_ih + b_hh at every step (T, N, G))."""
        w_ih = self.params["rnn.weight_ih_l0"]
        ok = x.dim() == 4 and x.shape[1] * x.shape[3] == w_ih.shape[1]
        self._check_input(x, ok, f"(N, C, H, W) with C*W = {w_ih.shape[1]}")
        n, c, steps, w = x.shape
        xs = x.permute(2, 0, 1, 3).reshape(steps * n, c * w)  # row t of image n at t*N + n: a step's rows together
        bias = self.params["rnn.bias_ih_l0"] + self.params["rnn.bias_hh_l0"]
        return xs, torch.addmm(bias, xs, w_ih.t()).view(steps, n, -1)

    def _weight_gradients(self, dz: torch.Tensor, xs: torch.Tensor, h: torch.Tensor, x_shape: torch.Size,
                          ) -> torch.Tensor | None:  # fmt: skip
        """Fill grads from every step's dL/d(pre-activation); return dx: x_shape (None without input_grad).

        dz: (T, N, G); xs: (T*N, D), the rows; h: (T+1, N, H), the states h_0 .. h_T. Each weight
        is used at every step, so its gradient is a sum over steps: one product over T*N rows.
        """
        steps, n, g = dz.shape
        dz_rows = dz.view(steps * n, g)
        self.grads["rnn.weight_ih_l0"] = dz_rows.t() @ xs  # (G, D)
        self.grads["rnn.weight_hh_l0"] = dz_rows.t() @ h[:-1].reshape(steps * n, -1)  # step t multiplies h_{t-1}
        self.grads["rnn.bias_ih_l0"] = dz_rows.sum(0)
        self.grads["rnn.bias_hh_l0"] = self.grads["rnn.bias_ih_l0"].clone()  # both biases enter z the same way
        if not self.input_grad:
            return None
        _, c, _, w = x_shape
        dxs = dz_rows @ self.params["rnn.weight_ih_l0"]  # (T*N, D)
        return dxs.view(steps, n, c, w).permute(1, 2, 0, 3)  # back to (N, C, H, W)


class RNN(Recurrent):
    """The tanh cell: h_t = tanh(z_t), z_t = x_t W_ih^T + b_ih + h_{t-1} W_hh^T + b_hh, h_0 = 0.

    x: (N, C, H, W) -> h_T: (N, hidden).
    backward, from step T down to 1, with dh_T = dout:
      dz_t = dh_t * (1 - h_t^2)          (N, H): through the tanh
      dh_{t-1} = dz_t W_hh               (N, H): back one step
    then dW_ih = sum_t dz_t^T x_t, dW_hh = sum_t dz_t^T h_{t-1}, db = sum_t sum_n dz_t, dx_t = dz_t W_ih.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xs, z = self._input_products(x)  # z: (T, N, H), the input's share so far
        steps, n, _ = z.shape
        w_hh_t = self.params["rnn.weight_hh_l0"].t()
        h = z.new_empty(steps + 1, n, self.hidden)  # h_0 .. h_T
        h[0] = 0
        for t in range(steps):
            z[t].addmm_(h[t], w_hh_t)
            torch.tanh(z[t], out=h[t + 1])
        self._save(h[-1].shape, x.shape, xs, h)
        return h[-1]

    def backward(self, dout: torch.Tensor) -> torch.Tensor | None:
        """dout: (N, H) = dL/dh_T -> dx: (N, C, H, W); fills the weights' and biases' grads."""
        x_shape, xs, h = self._take(dout)
        w_hh = self.params["rnn.weight_hh_l0"]
        dz = torch.addcmul(torch.ones_like(h[1:]), h[1:], h[1:], value=-1)  # (T, N, H): tanh' at every step
        dh = dout
        for t in reversed(range(len(dz))):
            dz[t].mul_(dh)
            if t > 0:  # h_0 is a constant: nothing to send it
                dh = dz[t] @ w_hh
        return self._weight_gradients(dz, xs, h, x_shape)


class LSTM(Recurrent):
    """The LSTM cell, as nn.LSTM computes it (gates in the order i, f, g, o), h_0 = c_0 = 0:

      z_t = x_t W_ih^T + b_ih + h_{t-1} W_hh^T + b_hh     (N, 4H)
      i, f, o = sigmoid(z_t's parts), g = tanh(z_t's part)
      c_t = f * c_{t-1} + i * g                          h_t = o * tanh(c_t)

    x: (N, C, H, W) -> h_T: (N, hidden).
    backward, from step T down to 1, with dh_T = dout and nothing yet in dc:
      dc_t += dh_t * o * (1 - tanh(c_t)^2)           the cell reaches h_t through tanh
      dz_t = [dc_t * g * i(1-i), dc_t * c_{t-1} * f(1-f), dc_t * i * (1-g^2), dh_t * tanh(c_t) * o(1-o)]
      dh_{t-1} = dz_t W_hh,   dc_{t-1} = dc_t * f                                  (N, H)
    and the weight gradients as for RNN.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xs, z = self._input_products(x)  # z: (T, N, 4H), the input's share so far
        steps, n, _ = z.shape
        hid = self.hidden
        w_hh_t = self.params["rnn.weight_hh_l0"].t()
        a = torch.empty_like(z)  # the gates after their activations: i, f, g, o
        h = z.new_empty(steps + 1, n, hid)  # h_0 .. h_T
        c = z.new_empty(steps + 1, n, hid)  # c_0 .. c_T
        tanh_c = z.new_empty(steps, n, hid)  # tanh(c_1) .. tanh(c_T)
        h[0] = c[0] = 0
        for t in range(steps):
            z[t].addmm_(h[t], w_hh_t)
            # one sigmoid over all four gates, then g's quarter overwritten with its tanh
            torch.sigmoid(z[t], out=a[t])
            torch.tanh(z[t, :, 2 * hid : 3 * hid], out=a[t, :, 2 * hid : 3 * hid])
            i, f, g, o = a[t].split(hid, dim=1)
            torch.mul(f, c[t], out=c[t + 1])
            c[t + 1].addcmul_(i, g)
            torch.tanh(c[t + 1], out=tanh_c[t])
            torch.mul(o, tanh_c[t], out=h[t + 1])
        self._save(h[-1].shape, x.shape, xs, h, c, a, tanh_c)
        return h[-1]

    def backward(self, dout: torch.Tensor) -> torch.Tensor | None:
        """dout: (N, H) = dL/dh_T -> dx: (N, C, H, W); fills the weights' and biases' grads."""
        x_shape, xs, h, c, a, tanh_c = self._take(dout)
        steps, n, _ = a.shape
        hid = self.hidden
        w_hh = self.params["rnn.weight_hh_l0"]
        i, f, g, o = a.split(hid, dim=2)  # each (T, N, H)
        # What each gate's part of dz_t is dc_t (i, f, g) or dh_t (o) times, for all steps at
        # once: the factor it meets in c_t or h_t, times its activation's derivative.
        factor = torch.empty_like(a)
        factor_i, factor_f, factor_g, factor_o = factor.split(hid, dim=2)
        torch.addcmul(i, i, i, value=-1, out=factor_i).mul_(g)  # i(1-i) * g
        torch.addcmul(f, f, f, value=-1, out=factor_f).mul_(c[:-1])  # f(1-f) * c_{t-1}
        torch.mul(i, g, out=factor_g)
        torch.addcmul(i, factor_g, g, value=-1, out=factor_g)  # i (1-g^2)
        torch.addcmul(o, o, o, value=-1, out=factor_o).mul_(tanh_c)  # o(1-o) * tanh(c_t)
        cell_from_h = torch.addcmul(o, h[1:], tanh_c, value=-1)  # o (1 - tanh(c_t)^2), as h_t = o tanh(c_t)
        dz = factor  # (T, N, 4H): each step's factors become its dz, in place
        dh, dc = dout, torch.zeros_like(dout)
        for t in reversed(range(steps)):
            dc.addcmul_(dh, cell_from_h[t])
            dz[t, :, : 3 * hid].view(n, 3, hid).mul_(dc.unsqueeze(1))
            dz[t, :, 3 * hid :].mul_(dh)
            if t > 0:  # h_0 and c_0 are constants: nothing to send them
                dh = dz[t] @ w_hh
                dc.mul_(f[t])
        return self._weight_gradients(dz, xs, h, x_shape)


def row_reader_from_torch(module: nn.Module, path: str) -> Recurrent:
    """The hand-written layer for a cnnlab.models.recurrent.RowReader: RNN or LSTM, after the module it runs.

    Exact types, as in network.py: a subclass may compute something else.
    """
    layer_type = {nn.RNN: RNN, nn.LSTM: LSTM}.get(type(module.rnn))
    if layer_type is None:
        raise CnnlabError(f"cnnlab's backprop has no hand-written {type(module.rnn).__name__} (module '{path}'): "
                          "use --engine autograd, or nn.RNN or nn.LSTM")  # fmt: skip
    return layer_type.from_torch(module, path)
