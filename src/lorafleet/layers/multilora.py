"""The batched multi-adapter LoRA op (Punica's SGMV/BGMV in plain PyTorch): semantics and paths.

Semantics. Per targeted linear, the resident adapters are stacked in slots:

    A: [S, r_max, d_in]    B: [S, d_out, r_max]    scale: [S]      (S = max_slots + 1)

Slot 0 means "no adapter" and stays all zeros. Given rows x: [T, d_in] and a per-row slot index
idx: [T] (long),

    y[i] = base(x)[i] + scale[idx[i]] * (x[i] @ A[idx[i]].T) @ B[idx[i]].T

Mixed ranks are zero-padded up to r_max, which is exact: a zero row k of A gives h[k] = 0, and
a zero column k of B multiplies that 0, so padded ranks add exactly 0.0. The padding is not paid
for: the segmented path slices each slot to its own rank (`ranks`), the gathered path to the
largest rank resident in the layer.

Two paths compute the delta:
- segmented (SGMV): rows grouped by slot (a stable sort), one matmul pair per distinct non-zero
  slot on views of A[s] and B[s] (nothing is gathered), scattered back. Slot-0 rows cost nothing.
  Best for prefill, where many rows share an adapter.
- gathered (BGMV): the rows are gathered into one zero-padded group per distinct slot,
  xg: [G, m, d_in] (m = most rows of any slot), and two `torch.bmm` run over the groups with
  A[slots]: [G, r, d_in] and B[slots]. No Python loop, and each resident adapter's weights are
  read once per layer, not once per row: when the batch's slots form a contiguous range (the
  engine hands out slots 1, 2, ...), A[lo:hi] is a view and nothing is copied at all. Padding
  rows are masked to 0 before the second matmul and added to row 0, which adds exactly 0.0.
  Best for decode, where rows are about as many as distinct adapters.
`choose_path` picks segmented when rows per distinct adapter >= SEGMENT_MIN_ROWS_PER_SLOT.

Mixtures (layers/mixture.py). A row may use K slots s_1..s_K at once (a per-request mixture,
or MoLE's experts) with weights w: [K] fixed for the request, or w: [n, K] per row computed in
every layer by a gate (`MixtureGate`: layer name, the rows' input x: [n, d_in], the slots, and
optionally each candidate's delta [n, K, d_out] -> [n, K]):

    y[i] = base(x)[i] + sum_k w[i, k] * scale[s_k] * (x[i] @ A[s_k].T) @ B[s_k].T

which is exactly one adapter of rank sum_k r_k with A = cat_k(A[s_k]) (rows) and
B = cat_k(w_k scale[s_k] B[s_k]) (columns) at scale 1: PEFT's `cat` combination. Single-adapter
rows keep the path above untouched (a mixture row has slot 0 in the row map, and `[(s, 1.0)]`
is served as a plain slot-s row by the engine). Mixture rows become entries (row, slot, weight),
one per row and candidate, planned by `plan_rows` over the entries' slots like rows: the same
two paths, with each entry's weight multiplied into h = x @ A.T and the scatter-add summing a
row's K entries. A gate that reads the candidates' deltas gets them computed per mixture.

Layout: B is best passed as `Bt.transpose(1, 2)` of a contiguous Bt: [S, r_max, d_out] (what
MultiLoRALinear in layers/linear.py stores): each slot's rank-k rows of A and Bt are then
contiguous, so slicing a rank or gathering a slot copies contiguous memory. Any strides give
the same result. The batch's map (slots per row or per sequence, and the row mixtures) lives
in a MultiLoRAContext shared by every layer, which builds the plans once per forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lorafleet.kernels.packed import CHUNK_ROWS, ROW_BUCKET

# Measured on this project's 2-core CPU with SmolLM2's shapes (7 linears, rank 16, best of 25):
# the grouped bmm beats the loop of per-slot matmul pairs up to ~16 rows per adapter (0.85 vs
# 0.55 of base at 64 rows / 4 adapters); at 64 rows per adapter the per-slot GEMMs win (0.99 vs
# 0.80). Prefill (whole prompts per adapter) lands on segmented, decode on gathered.
SEGMENT_MIN_ROWS_PER_SLOT = 32
PATHS = ("segmented", "gathered")


@dataclass(frozen=True)
class SlotPlan:
    """What every layer needs to know about one batch's row -> slot map (built once per forward).

    `rows` / `slots`: the rows with a non-zero slot and their slots, grouped by slot (stable
    order); `rows` is None when that is all rows in their own order (no gather/scatter needed).
    `segments`: (slot, start, end) ranges into those grouped rows, one per distinct slot."""

    path: str  # "none" (every row is slot 0), "segmented" or "gathered"
    rows: Tensor | None  # [T_nz] long
    slots: Tensor  # [T_nz] long
    segments: tuple[tuple[int, int, int], ...]
    groups: GroupLayout | None = None  # the gathered path's layout (None for other paths)


@dataclass(frozen=True)
class GroupLayout:
    """The gathered path's rows in G zero-padded groups of m, one group per distinct slot.

    `src`: [G*m] long, the row of x (and of y) each group position holds; padding positions
    hold row 0 and are masked by `pad`: [G, m, 1] bool (None when no group is padded).
    `weights`: a slice lo:hi of the slot axis when the distinct slots are exactly lo..hi-1
    (a view, no copy), else `slot_index`: [G] long for index_select. `identity`: src is
    0..T-1 (rows already grouped, no padding): x and y are viewed as [G, m, d], no gather."""

    n_groups: int
    per_group: int
    src: Tensor
    pad: Tensor | None
    weights: slice | None
    slot_index: Tensor
    identity: bool


def choose_path(n_rows: int, n_distinct: int) -> str:
    """Segmented when the non-zero rows average >= SEGMENT_MIN_ROWS_PER_SLOT per distinct slot."""
    if n_distinct == 0:
        return "none"
    return "segmented" if n_rows >= SEGMENT_MIN_ROWS_PER_SLOT * n_distinct else "gathered"


def plan_rows(idx: Tensor, path: str | None = None) -> SlotPlan:
    """Group the rows of `idx` ([T] long) by slot and choose a path (`path` forces one)."""
    idx = idx.reshape(-1)  # [T]
    sorted_slots, order = torch.sort(idx, stable=True)  # [T], [T]: slot 0 rows come first
    slots, counts = torch.unique_consecutive(sorted_slots, return_counts=True)
    slot_list, count_list = slots.tolist(), counts.tolist()  # the one host sync per forward
    if slot_list and slot_list[0] < 0:
        raise ValueError(f"slot indices must be >= 0, got {slot_list[0]}")
    n_zero = count_list[0] if slot_list and slot_list[0] == 0 else 0
    if n_zero:
        slot_list, count_list = slot_list[1:], count_list[1:]
    segments, start = [], 0
    for slot, count in zip(slot_list, count_list, strict=True):
        segments.append((int(slot), start, start + int(count)))
        start += int(count)
    chosen = choose_path(idx.numel() - n_zero, len(segments)) if path is None else path
    if chosen not in (*PATHS, "none"):
        raise ValueError(f"unknown path {path!r}: use one of {PATHS}")
    if not segments:
        chosen = "none"
    if n_zero == 0 and torch.equal(sorted_slots, idx):
        rows, grouped = None, idx  # already grouped (e.g. an engine's prefill layout)
    else:
        rows, grouped = order[n_zero:], sorted_slots[n_zero:]  # [T_nz], [T_nz]
    groups = None
    if chosen == "gathered":
        groups = _group_layout(order[n_zero:], segments, rows is None, idx.device)
    return SlotPlan(chosen, rows, grouped, tuple(segments), groups)


def _group_layout(order: Tensor, segments: list, in_place: bool, device) -> GroupLayout:
    """Lay the grouped rows `order` ([T_nz], segment by segment) out as G groups of m."""
    n_groups = len(segments)
    per_group = max(end - start for _, start, end in segments)
    slot_ids = [slot for slot, _, _ in segments]
    lo, hi = slot_ids[0], slot_ids[-1] + 1
    weights = slice(lo, hi) if hi - lo == n_groups else None  # sorted and distinct: contiguous
    slot_index = torch.tensor(slot_ids, dtype=torch.long, device=device)  # [G]
    uniform = all(end - start == per_group for _, start, end in segments)
    if uniform:
        src = order  # [G*m]: every group is full
        pad = None
    else:
        # position p of group g holds the segment's p-th row, or padding (row 0, masked)
        offsets = torch.arange(per_group, device=device)  # [m]
        starts = torch.tensor([s for _, s, _ in segments], device=device)  # [G]
        counts = torch.tensor([e - s for _, s, e in segments], device=device)  # [G]
        where = starts[:, None] + offsets[None, :]  # [G, m] index into `order`
        pad = offsets[None, :] >= counts[:, None]  # [G, m]
        src = order[where.clamp(max=order.numel() - 1)].masked_fill(pad, 0).reshape(-1)  # [G*m]
        pad = pad.unsqueeze(-1)  # [G, m, 1]
    identity = in_place and pad is None
    return GroupLayout(n_groups, per_group, src, pad, weights, slot_index, identity)


def add_lora_segmented_(y, x, A, B, scale, plan: SlotPlan, ranks=None, weights=None) -> Tensor:
    """y += delta over the rows of `plan`, one matmul pair per distinct slot (SGMV); in place.

    y: [T, d_out], x: [T, d_in] (same dtype as A, B); `ranks[s]` (optional) is slot s's true
    rank, 0 = not adapted here (skipped); `weights` (optional, mixtures): [T_nz], a factor per
    position of the plan's grouped rows."""
    Bt = B.transpose(1, 2)  # [S, r_max, d_out]
    xs = x if plan.rows is None else x.index_select(0, plan.rows)  # [T_nz, d_in], grouped
    # Rows already grouped in place add straight into y; others go through a buffer that is
    # scattered back (every row of it is written below, so it need not be zeroed). A bucketed
    # product writes its padding rows into the buffer too: into the rows of the segment or
    # chunk that follows (written after it), or past the end (ROW_BUCKET - 1 spare rows).
    bucketed = buckets_rows(x)
    spare = ROW_BUCKET - 1 if bucketed else 0
    out = None if plan.rows is None else y.new_empty(xs.shape[0] + spare, y.shape[1])
    for slot, start, end in plan.segments:
        r = A.shape[1] if ranks is None else ranks[slot]
        if r == 0:
            if out is not None:
                out[start:end].zero_()
            continue
        factor = None if scale is None else scale[slot]
        for lo, hi in _chunks(start, end, bucketed):
            rows = _bucket_rows(xs, lo, hi) if bucketed else xs[lo:hi]  # [m, d_in], m >= n
            _slot_product_(
                y[lo:hi] if out is None else out[lo : lo + rows.shape[0]],
                rows,
                A[slot, :r],
                Bt[slot, :r],
                factor,
                None if weights is None else weights[lo:hi],
                add=out is None,
            )
    if out is not None:
        y.index_add_(0, plan.rows, out[: xs.shape[0]])  # scatter the grouped rows back
    return y


def buckets_rows(x: Tensor) -> bool:
    """Whether products over x's rows run on bucketed row counts: bfloat16 on the CPU, where
    oneDNN keeps a primitive (and its memory) for every row count it meets (kernels/packed.py:
    ~1.5 MB each, so a server meeting prompts of every length grows without it)."""
    return x.dtype == torch.bfloat16 and x.is_cpu


def _chunks(start: int, end: int, bucketed: bool):
    """(lo, hi) ranges covering start..end: one, or chunks of CHUNK_ROWS when `bucketed`."""
    if not bucketed:
        yield start, end
        return
    for lo in range(start, end, CHUNK_ROWS):
        yield lo, min(end, lo + CHUNK_ROWS)


def _bucket_rows(xs: Tensor, lo: int, hi: int) -> Tensor:
    """Rows lo..hi of xs [T, d_in] and more, up to a multiple of ROW_BUCKET: the rows that
    follow in xs (other segments' rows, whose results are cut off; a view, nothing copied), or
    zero rows where xs ends first."""
    rows = -(-(hi - lo) // ROW_BUCKET) * ROW_BUCKET
    if lo + rows <= xs.shape[0]:
        return xs[lo : lo + rows]  # [rows, d_in]
    zeros = xs.new_zeros(lo + rows - xs.shape[0], xs.shape[1])
    return torch.cat((xs[lo:], zeros))  # [rows, d_in]


def _slot_product_(target, x, a, bt, scale, weights, *, add: bool) -> None:
    """target (+)= ((x[:n] @ a.T) * scale * weights) @ bt for one slot's n rows, in place.

    target: [n, d_out] or, overwritten, [m, d_out] (its rows past n take the padding's results);
    x: [m, d_in] with m >= n (rows past n: padding, computed and cut off or written to target's
    extra rows); a: [r, d_in], bt: [r, d_out], scale: a 0-dim tensor or None, weights: [n] or
    None (n = len(weights) then); `add`: accumulate into target, else overwrite it."""
    h = x @ a.T  # [m, d_in] @ [d_in, r] -> [m, r]
    if scale is not None:
        h.mul_(scale)
    if weights is not None:
        h[: weights.shape[0]].mul_(weights[:, None])  # [n, r] * [n, 1]
    if x.shape[0] == target.shape[0]:
        if add:
            target.addmm_(h, bt)  # += [m, r] @ [r, d_out]
        else:
            torch.mm(h, bt, out=target)  # [m, r] @ [r, d_out]
        return
    delta = (h @ bt)[: target.shape[0]]  # [m, r] @ [r, d_out] -> [m, d_out] -> [n, d_out]
    if add:
        target.add_(delta)
    else:
        target.copy_(delta)


def add_lora_gathered_(y, x, A, B, scale, plan: SlotPlan, rank=None, weights=None) -> Tensor:
    """y += delta with rows gathered into one group per slot and two batched matmuls (BGMV).

    y: [T, d_out], x: [T, d_in] (same dtype as A, B); `rank` (optional) is the largest rank
    resident in A and B (the rest is zero padding, not computed); `weights` (optional,
    mixtures): [G*m], a factor per group position. In place."""
    r = A.shape[1] if rank is None else rank
    if r == 0:
        return y
    lay = plan.groups if plan.groups is not None else _regroup(plan, x.device)
    G, m = lay.n_groups, lay.per_group
    Bt = B.transpose(1, 2)  # [S, r_max, d_out]
    if lay.weights is not None:
        Ag, Bg = A[lay.weights, :r], Bt[lay.weights, :r]  # views: [G, r, d_in], [G, r, d_out]
    else:
        Ag = A[:, :r].index_select(0, lay.slot_index)  # [G, r, d_in], one copy per adapter
        Bg = Bt[:, :r].index_select(0, lay.slot_index)  # [G, r, d_out]
    if lay.identity:
        xg = x.view(G, m, x.shape[1])  # [T, d_in] -> [G, m, d_in]
    else:
        xg = x.index_select(0, lay.src).view(G, m, x.shape[1])  # [G*m, d_in] -> [G, m, d_in]
    m_run = _group_bucket(m) if buckets_rows(x) else m
    if m_run != m:  # zero rows after each group's m, cut off below
        xg = torch.cat((xg, xg.new_zeros(G, m_run - m, xg.shape[2])), 1)  # [G, m_run, d_in]
    h = torch.bmm(xg, Ag.transpose(1, 2))  # [G, m_run, d_in] @ [G, d_in, r] -> [G, m_run, r]
    if scale is not None:
        h.mul_(scale.index_select(0, lay.slot_index)[:, None, None])  # [G, 1, 1]
    hm = h[:, :m]  # [G, m, r]: a view, the real positions
    if weights is not None:
        hm.mul_(weights.view(G, m, 1))  # [G*m] -> [G, m, 1]
    if lay.pad is not None:
        hm.masked_fill_(lay.pad, 0.0)  # padding rows contribute exactly 0
    if lay.identity and m_run == m:
        y.view(G, m, y.shape[1]).baddbmm_(h, Bg)  # [G, m, d_out] += [G, m, r] @ [G, r, d_out]
        return y
    out = torch.bmm(h, Bg)[:, :m]  # [G, m_run, d_out] -> [G, m, d_out]
    if lay.identity:
        y.view(G, m, y.shape[1]).add_(out)
    else:
        y.index_add_(0, lay.src, out.reshape(G * m, y.shape[1]))  # padding adds 0.0 to row 0
    return y


def _group_bucket(m: int) -> int:
    """The rows per group a bucketed gathered product runs with: m rounded up to a power of
    two up to ROW_BUCKET, then to a multiple of ROW_BUCKET."""
    if m <= ROW_BUCKET:
        return 1 << (m - 1).bit_length()
    return -(-m // ROW_BUCKET) * ROW_BUCKET


def _regroup(plan: SlotPlan, device) -> GroupLayout:
    """The group layout for a plan made for another path (a caller forcing "gathered")."""
    order = plan.rows if plan.rows is not None else torch.arange(plan.slots.numel(), device=device)
    return _group_layout(order, list(plan.segments), plan.rows is None, device)


def apply_plan_(y, x, A, B, scale, plan: SlotPlan, ranks=None) -> Tensor:
    """y += delta by the plan's path, in place; `ranks[s]` (optional) is slot s's true rank."""
    if plan.path == "segmented":
        return add_lora_segmented_(y, x, A, B, scale, plan, ranks)
    if plan.path == "gathered":
        return add_lora_gathered_(y, x, A, B, scale, plan, None if ranks is None else max(ranks))
    return y


def lora_delta(x: Tensor, A: Tensor, B: Tensor, scale: Tensor | None, idx: Tensor, path=None):
    """delta[i] = scale[idx[i]] * (x[i] @ A[idx[i]].T) @ B[idx[i]].T, by the path `choose_path`
    picks for this batch (or `path`: "segmented" / "gathered").

    x: [T, d_in], A: [S, r, d_in], B: [S, d_out, r], scale: [S] or None (already folded into B),
    idx: [T] long -> delta: [T, d_out] (zero for slot-0 rows)."""
    y = x.new_zeros(x.shape[0], B.shape[1])  # [T, d_out]
    return apply_plan_(y, x, A, B, scale, plan_rows(idx, path))


def lora_delta_segmented(x: Tensor, A: Tensor, B: Tensor, scale: Tensor | None, idx: Tensor):
    """The delta by the segmented (SGMV) path; shapes as in lora_delta."""
    return lora_delta(x, A, B, scale, idx, "segmented")


def lora_delta_gathered(x: Tensor, A: Tensor, B: Tensor, scale: Tensor | None, idx: Tensor):
    """The delta by the gathered (BGMV) path; shapes as in lora_delta."""
    return lora_delta(x, A, B, scale, idx, "gathered")
