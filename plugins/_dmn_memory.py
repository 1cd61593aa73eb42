"""DMN's dual memory: the static and dynamic memories of one CLIP and their read-out.

Zhang, Zhu, Wang, Zhang, "Dual Memory Networks: A Versatile Adaptation
Approach for Vision-Language Models", CVPR 2024 (reference code YBZh/DMN,
``dmn_main.py``: ``DualMem``, ``get_image_pred``, ``update_memory_bank``).
Holds :class:`DualMemory` (the per-class memories, the test-time write rule,
the attention read-out with its learnable residual biases, and a whole test
episode computed in one batch), :data:`BIASES` (the names of those biases) and
:func:`entropy`. The plugin using them is :class:`contlearn.plugins.dmn.DMN`.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

BIASES = ("bias_query", "bias_key", "bias_value", "bias_out", "bias_text")


def entropy(p: torch.Tensor) -> torch.Tensor:
    """Shannon entropy over the last dimension of probabilities."""
    return -(p * torch.log(p + 1e-8)).sum(dim=-1)


class DualMemory(nn.Module):
    """The static and dynamic memories of DMN and their read-out.

    Buffers (``C`` classes, ``K`` shots, ``L`` slots, ``D`` feature size):
    ``text [C, D]``, ``shot_feat [C, K, D]``, ``shot_mask [C, K]``,
    ``dyn_feat [C, L, D]``, ``dyn_ent [C, L]``, ``dyn_count [C]``. Parameters
    (used only when ``learnable``): the residual biases ``bias_* [C, D]``.

    :param reads_static: the dynamic read-out also attends over each class's
        static entries (text and shots), as ``get_image_pred`` of the reference
        code does; a class with no stored test feature then reads out its text
        embedding instead of nothing.
    """

    text: torch.Tensor
    shot_feat: torch.Tensor
    shot_mask: torch.Tensor
    dyn_feat: torch.Tensor
    dyn_ent: torch.Tensor
    dyn_count: torch.Tensor
    bias_query: nn.Parameter
    bias_key: nn.Parameter
    bias_value: nn.Parameter
    bias_out: nn.Parameter
    bias_text: nn.Parameter

    def __init__(
        self,
        dim: int,
        memory_size: int = 50,
        shots: int = 0,
        beta: float = 5.5,
        logit_scale: float = 100.0,
        learnable: bool = False,
        reads_static: bool = True,
    ):
        super().__init__()
        self.dim, self.memory_size, self.shots = dim, memory_size, shots
        self.beta, self.logit_scale = beta, logit_scale
        self.learnable, self.reads_static = learnable, reads_static
        self.register_buffer("text", torch.zeros(0, dim))
        self.register_buffer("shot_feat", torch.zeros(0, shots, dim))
        self.register_buffer("shot_mask", torch.zeros(0, shots, dtype=torch.bool))
        self.register_buffer("dyn_feat", torch.zeros(0, memory_size, dim))
        self.register_buffer("dyn_ent", torch.zeros(0, memory_size))
        self.register_buffer("dyn_count", torch.zeros(0, dtype=torch.long))
        for name in BIASES:
            setattr(self, name, nn.Parameter(torch.zeros(0, dim)))

    @property
    def n_classes(self) -> int:
        return self.text.shape[0]

    def grow(self, n_classes: int) -> None:
        """Add empty memories (and zero biases) for classes up to ``n_classes``."""
        extra = n_classes - self.n_classes
        if extra <= 0:
            return
        for name, buf in list(self._buffers.items()):
            assert buf is not None
            pad = buf.new_zeros((extra, *buf.shape[1:]))
            self._buffers[name] = torch.cat([buf, pad])
        for name in BIASES:
            old = getattr(self, name)
            setattr(self, name, nn.Parameter(torch.cat([old.data, old.new_zeros(extra, self.dim)])))

    def reset_dynamic(self) -> None:
        """Empty every dynamic slot."""
        self.dyn_feat.zero_()
        self.dyn_ent.zero_()
        self.dyn_count.zero_()

    def dynamic_state(self) -> tuple[torch.Tensor, ...]:
        return self.dyn_feat.clone(), self.dyn_ent.clone(), self.dyn_count.clone()

    def restore_dynamic(self, state: tuple[torch.Tensor, ...]) -> None:
        self.dyn_feat.copy_(state[0])
        self.dyn_ent.copy_(state[1])
        self.dyn_count.copy_(state[2])

    # ------------------------------------------------------------------ update

    def update(self, v: torch.Tensor, p_bar: torch.Tensor) -> None:
        """Write test feature ``v`` ``[D]`` into the memory of its pseudo-label
        ``argmax p_bar``: into the next free slot, or, when the class is full,
        over its highest-entropy slot if ``v``'s entropy is lower (the rule of
        ``update_memory_bank`` in the reference code). One image at a time;
        :meth:`stream` does a whole batch at once."""
        c = p_bar.argmax()
        h = entropy(p_bar)
        n = self.dyn_count[c]
        full = n >= self.memory_size
        j = torch.where(full, self.dyn_ent[c].argmax(), n.clamp(max=self.memory_size - 1))
        take = ~full | (h < self.dyn_ent[c, j])
        self.dyn_feat[c, j] = torch.where(take, v, self.dyn_feat[c, j])
        self.dyn_ent[c, j] = torch.where(take, h, self.dyn_ent[c, j])
        self.dyn_count[c] += (~full).long()

    # ---------------------------------------------------------------- read-out

    def text_weights(self) -> torch.Tensor:
        """The text classifier ``[C, D]``, with its residual bias when learnable."""
        if self.learnable:
            return F.normalize(self.text + self.bias_text, dim=-1)
        return self.text

    def read(self, v: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, C]`` of queries ``v [B, D]`` against memories ``keys
        [C, M, D]`` whose valid entries ``mask`` (``[C, M]``, or ``[B, C, M]``
        per query) marks: per class, the
        values weighted by ``exp(-beta (1 - q . k))``, summed, renormalised,
        times ``logit_scale``, dotted with ``v``. Empty entries weigh nothing."""
        q, k, val = v, keys, keys
        if self.learnable:
            q = F.normalize(v + self.bias_query.mean(dim=0), dim=-1)
            k = keys + self.bias_key[:, None]
            val = keys + self.bias_value[:, None]
        k, val = F.normalize(k, dim=-1), F.normalize(val, dim=-1)
        z = (-self.beta * (1 - torch.einsum("bd,cmd->bcm", q, k))).masked_fill(~mask, -math.inf)
        # Subtracting the per-class maximum changes no renormalised read-out and
        # keeps exp finite for any beta (beta -> inf is the nearest entry).
        top = z.amax(dim=-1, keepdim=True)
        w = torch.exp(z - torch.where(torch.isfinite(top), top, torch.zeros_like(top)))
        a = F.normalize(torch.einsum("bcm,cmd->bcd", w, val), dim=-1)
        if self.learnable:
            a = F.normalize(a + self.bias_out, dim=-1)
        return self.logit_scale * torch.einsum("bcd,bd->bc", a, v)

    def static_entries(self) -> tuple[torch.Tensor, torch.Tensor]:
        ones = torch.ones(self.n_classes, 1, dtype=torch.bool, device=self.text.device)
        keys = torch.cat([self.text[:, None], self.shot_feat], 1)
        return keys, torch.cat([ones, self.shot_mask], 1)

    def static_logits(self, v: torch.Tensor) -> torch.Tensor:
        return self.read(v, *self.static_entries())

    def dynamic_logits(self, v: torch.Tensor) -> torch.Tensor:
        slots = torch.arange(self.memory_size, device=v.device)[None] < self.dyn_count[:, None]
        if not self.reads_static:
            return self.read(v, self.dyn_feat, slots)
        keys, mask = self.static_entries()
        return self.read(v, torch.cat([self.dyn_feat, keys], 1), torch.cat([slots, mask], 1))

    def stream(self, v: torch.Tensor, p_bar: torch.Tensor) -> torch.Tensor:
        """:meth:`update` with each of ``v [N, D]`` in turn, each followed by its
        :meth:`dynamic_logits`; returns those logits ``[N, C]``.

        Computed in one batch, exactly: the write decisions depend only on
        pseudo-labels and entropies, so they are replayed on the host first,
        giving every memory entry the interval of stream positions in which it
        is held; read-out ``i`` then masks out entries not held at ``i``.
        """
        N, D = v.shape
        C, L = self.n_classes, self.memory_size
        labels, ents = p_bar.argmax(dim=1).tolist(), entropy(p_bar).tolist()
        count, slot_ent = self.dyn_count.tolist(), self.dyn_ent.tolist()
        # entries[c]: [row of `table`, first position held, first position not held]
        entries: list[list[list[int]]] = [
            [[c * L + j, 0, N] for j in range(count[c])] for c in range(C)
        ]
        holder = [list(range(count[c])) + [-1] * (L - count[c]) for c in range(C)]
        for i, (c, h) in enumerate(zip(labels, ents, strict=True)):
            if count[c] < L:
                j = count[c]
                count[c] += 1
            else:
                row = slot_ent[c]
                j = max(range(L), key=row.__getitem__)
                if not h < row[j]:
                    continue
                entries[c][holder[c][j]][2] = i
            slot_ent[c][j] = h
            holder[c][j] = len(entries[c])
            entries[c].append([C * L + i, i, N])
        M = max(1, max(len(e) for e in entries))
        padded = [e + [[0, N, 0]] * (M - len(e)) for e in entries]
        layout = torch.tensor(padded, dtype=torch.long).view(C, M, 3).to(v.device)
        table = torch.cat([self.dyn_feat.reshape(C * L, D), v])
        t = torch.arange(N, device=v.device)[:, None, None]
        held = (layout[None, :, :, 1] <= t) & (t < layout[None, :, :, 2])
        keys = table[layout[..., 0]]
        if self.reads_static:
            s_keys, s_mask = self.static_entries()
            keys = torch.cat([keys, s_keys], 1)
            held = torch.cat([held, s_mask[None].expand(N, -1, -1)], 2)
        logits = self.read(v, keys, held)
        final = torch.tensor(
            [
                [entries[c][holder[c][j]][0] if holder[c][j] >= 0 else c * L + j for j in range(L)]
                for c in range(C)
            ],
            dtype=torch.long,
            device=v.device,
        ).view(C, L)
        self.dyn_feat.copy_(table[final])
        self.dyn_ent.copy_(torch.tensor(slot_ent, dtype=self.dyn_ent.dtype).view(C, L))
        self.dyn_count.copy_(torch.tensor(count, dtype=torch.long))
        return logits

    @torch.no_grad()
    def episode(self, feats: torch.Tensor, fraction: float = 0.1) -> tuple[torch.Tensor, ...]:
        """Classify a stream of test images, updating the dynamic memory.

        :param feats: ``[N, V, D]`` normalised features of ``V`` views of each
            image, view 0 the image itself.
        :param fraction: the share of lowest-entropy views averaged into ``p_bar``.
        :return: ``P_text``, ``P_dynamic``, ``P_static``, each ``[N, C]``. Image
            ``i`` updates the memory (with its pseudo-label ``argmax p_bar``)
            before its dynamic read-out, as in the reference code.
        """
        V = feats.shape[1]
        p_views = F.softmax(self.logit_scale * feats @ self.text_weights().t(), dim=-1)
        keep = max(1, int(V * fraction))
        idx = entropy(p_views).argsort(dim=1)[:, :keep]
        idx = idx[..., None].expand(-1, -1, p_views.shape[-1])
        p_bar = torch.gather(p_views, 1, idx).mean(dim=1)
        v = feats[:, 0]
        p_static = F.softmax(self.static_logits(v), dim=-1)
        p_dynamic = F.softmax(self.stream(v, p_bar), dim=-1)
        return p_views[:, 0], p_dynamic, p_static
