"""TokenGroups: named boolean masks over the positions of a batch (image, context, instruction, last, ...).

Positions are cache indices (the column in the padded input, then one per generated token), so they stay
right under left padding and across decode steps. Groups also carry, per sample, the patch grids of its images."""

from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import torch

from .errors import GroupError

BUILTIN_GROUPS = ("image", "video", "audio", "text", "context", "instruction", "question", "constraint", "system",
                  "last", "generated", "pad", "all")


class TokenGroups:
    """Named boolean masks ``[batch, positions]``.

    Built-in names: ``image``, ``video``, ``audio`` (modality token ids), ``text`` (every real non-modality
    prompt token), the prompt parts ``context``, ``instruction``, ``question``, ``constraint``, ``system``
    (character spans through the tokenizer's offsets), ``last`` (final prompt position), ``generated``
    (positions made by ``generate``), ``pad`` and ``all`` (every real position). Add your own with ``add``.

    ``image_grids``: per sample, where its ``image`` tokens lie on its images (see :meth:`with_image_grids`), or
    None where the model's adapter does not say (``image_grids_problem`` then says why, when known).
    """

    def __init__(self, masks: Mapping[str, torch.Tensor], prompt_length: int | None = None,
                 sample_ids: Sequence[str] | None = None, image_grids: Sequence[list[dict]] | None = None,
                 image_grids_problem: str | None = None):
        masks = {k: v if isinstance(v, torch.Tensor) and v.dtype == torch.bool else torch.as_tensor(v, dtype=torch.bool)
                 for k, v in masks.items()}   # (built at every forward: bool tensors pass as they are)
        shapes = {tuple(v.shape) for v in masks.values()}
        if len(shapes) != 1 or len(next(iter(shapes))) != 2:
            raise GroupError(f"TokenGroups masks must all be [batch, positions]; got shapes {sorted(shapes)}.")
        self._masks: dict[str, torch.Tensor] = masks
        b, s = next(iter(shapes))
        self.prompt_length = prompt_length if prompt_length is not None else s
        self.sample_ids = list(sample_ids) if sample_ids is not None else [str(i) for i in range(b)]
        if "generated" not in self._masks:
            self._masks["generated"] = torch.zeros(b, s, dtype=torch.bool)
        if "all" not in self._masks:
            pad = self._masks.get("pad")
            self._masks["all"] = torch.ones(b, s, dtype=torch.bool) if pad is None else ~pad
        if image_grids is not None and len(image_grids) != b:
            raise GroupError(f"image_grids has {len(image_grids)} entries; the batch has {b} samples.")
        self._image_grids: list[list[dict]] | None = list(image_grids) if image_grids is not None else None
        self._image_grids_problem = image_grids_problem
        self._grids_pending: tuple | None = None   # with_image_grids' (image mask, images), assigned when first read

    @property
    def image_grids(self) -> list[list[dict]] | None:
        """Per sample, its images' patch grids (read-only; set through the constructor or with_image_grids)."""
        self._assign_grids()
        return self._image_grids

    @property
    def image_grids_problem(self) -> str | None:
        """Why no sample has grids, where known."""
        self._assign_grids()
        return self._image_grids_problem

    def _like(self, masks: Mapping[str, torch.Tensor], rows: Sequence[int] | None = None,
              prompt_length: int | None = None, sample_ids: Sequence[str] | None = None) -> "TokenGroups":
        """New groups with ``masks`` and this batch's image grids (of samples ``rows``, default all)."""
        grids = self.image_grids
        if grids is not None and rows is not None:
            grids = [grids[i] for i in rows]
        return TokenGroups(masks, prompt_length=self.prompt_length if prompt_length is None else prompt_length,
                           sample_ids=self.sample_ids if sample_ids is None else sample_ids, image_grids=grids,
                           image_grids_problem=self.image_grids_problem)

    # -- construction ---------------------------------------------------------------------------------------
    @classmethod
    def from_input_ids(cls, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                       modality_token_ids: Mapping[str, Iterable[int]] | None = None,
                       mm_token_type_ids: torch.Tensor | None = None,
                       spans: Mapping[str, torch.Tensor] | None = None,
                       sample_ids: Sequence[str] | None = None) -> "TokenGroups":
        """Groups read from the ids: modality groups from special token ids (and ``mm_token_type_ids``: 1 image,
        2 video, 3 audio where the processor gives them), ``pad`` from the attention mask, ``text``, ``last``."""
        ids = input_ids.detach().cpu()
        b, s = ids.shape
        real = (attention_mask.detach().cpu().bool() if attention_mask is not None and attention_mask.dim() == 2
                else torch.ones(b, s, dtype=torch.bool))
        masks: dict[str, torch.Tensor] = {}
        modal = None   # the union of the modality masks (None: no modality position)
        for name, tids in (modality_token_ids or {}).items():
            tids = list(tids)
            if not tids:
                continue
            # built once per forward: one comparison where the modality has one token id (the usual case)
            m = (ids == tids[0] if len(tids) == 1 else torch.isin(ids, torch.tensor(tids))) & real
            masks[name] = m
            modal = m if modal is None else modal | m
        if mm_token_type_ids is not None:
            tt = mm_token_type_ids.detach().cpu()
            for code, name in ((1, "image"), (2, "video"), (3, "audio")):
                m = (tt == code) & real
                if m.any():
                    masks[name] = masks.get(name, torch.zeros(b, s, dtype=torch.bool)) | m
                    modal = m if modal is None else modal | m
        for name in ("image", "video", "audio"):   # always present, empty when the model has no such tokens
            if name not in masks:
                masks[name] = torch.zeros(b, s, dtype=torch.bool)
        masks["pad"] = ~real
        # never the caller's mask itself; (modality positions are real ones: real and not modal is real xor modal)
        masks["text"] = real.clone() if modal is None else real ^ modal
        # the last real position of each sample (position 0 for a sample with none)
        where = torch.arange(s)
        masks["last"] = where == (real * where).amax(dim=1, keepdim=True)
        for name, m in (spans or {}).items():
            masks[name] = torch.as_tensor(m, dtype=torch.bool) & real
        return cls(masks, prompt_length=s, sample_ids=sample_ids)

    def add(self, name: str, mask: torch.Tensor | Sequence[Sequence[int]]) -> "TokenGroups":
        """Add a user group: a ``[batch, positions]`` bool mask, or per sample a list of positions."""
        if isinstance(mask, torch.Tensor):
            m = mask.to(torch.bool).cpu()
            if m.dim() == 1:
                m = m.expand(self.batch_size, -1)
        else:
            m = torch.zeros(self.batch_size, self.length, dtype=torch.bool)
            if len(mask) != self.batch_size:
                raise GroupError(f"group {name!r}: got positions for {len(mask)} samples, the batch has "
                                 f"{self.batch_size}.")
            for i, pos in enumerate(mask):
                m[i, list(pos)] = True
        if tuple(m.shape) != (self.batch_size, self.length):
            raise GroupError(f"group {name!r} has shape {tuple(m.shape)}; the batch's groups are "
                             f"{(self.batch_size, self.length)} (batch, positions).")
        self._masks[name] = m
        return self

    def mark(self, name: str, mask: torch.Tensor) -> "TokenGroups":
        """Groups where the positions of ``mask`` ([batch, positions], padded with False or cut to this length)
        belong to modality ``name`` and not to ``text``: a modality the model marks in an input of its own rather
        than by token ids (e.g. an ``image_embeds_position_mask`` input). ``self`` where nothing changes."""
        m = torch.as_tensor(mask, dtype=torch.bool).detach().cpu()
        if m.dim() == 1:
            m = m.expand(self.batch_size, -1)
        m = m[:, :self.length]
        if m.shape[1] < self.length:
            m = torch.cat([m, torch.zeros(m.shape[0], self.length - m.shape[1], dtype=torch.bool)], dim=1)
        m = m & ~self._masks.get("pad", torch.zeros_like(m))
        have = self._masks.get(name)
        text = self._masks.get("text")
        if have is not None and not (m & ~have).any() and (text is None or not (m & text).any()):
            return self
        masks = dict(self._masks)
        masks[name] = m if have is None else have | m
        if text is not None:
            masks["text"] = text & ~m
        return self._like(masks)

    def prepend(self, n: int, name: str) -> "TokenGroups":
        """Groups with ``n`` positions put before the current ones, in group ``name`` (and ``all``): positions the
        model runs before its input ids without a token for them (a model that prepends its image embeddings)."""
        if n <= 0:
            return self
        b = self.batch_size
        masks = {k: torch.cat([torch.full((b, n), k in (name, "all"), dtype=torch.bool), v], dim=1)
                 for k, v in self._masks.items()}
        if name not in masks:
            masks[name] = torch.cat([torch.ones(b, n, dtype=torch.bool),
                                     torch.zeros(b, self.length, dtype=torch.bool)], dim=1)
        return self._like(masks, prompt_length=self.prompt_length + n)

    def with_image_grids(self, images: Sequence[Mapping]) -> "TokenGroups":
        """These groups plus where each sample's ``image`` tokens lie on its images. ``images``: the batch's images
        in order, each ``{"tokens": n, "views": [...]}`` (``Adapter.image_grids``); they are handed to the samples
        in turn, each sample taking images until their token counts add up to its number of ``image`` positions.
        Where the counts do not add up, no sample gets grids and ``image_grids_problem`` says why. (The Lens
        builds groups at every forward: the hand-out is made when the grids are first read.)"""
        out = self._like(dict(self._masks))
        out._grids_pending = (self._masks.get("image"), [dict(image) for image in images])
        return out

    def _assign_grids(self) -> None:
        """Hand out the images of ``with_image_grids`` (see there), once."""
        if self._grids_pending is None:
            return
        image, images = self._grids_pending
        self._grids_pending = None
        counts = image.sum(dim=1).tolist() if image is not None else [0] * self.batch_size
        per: list[list[dict]] = []
        k, problem = 0, None
        for sid, n in zip(self.sample_ids, counts):
            mine, total = [], 0
            while total < n and k < len(images):
                mine.append(images[k])
                total += int(images[k]["tokens"])
                k += 1
            if total != n:
                problem = (f"sample {sid!r} has {n} image tokens in its ids, but the grids of its images give "
                           f"{total}: the processor and the model disagree, or the ids were truncated")
                break
            per.append(mine)
        if problem is None and k != len(images):
            problem = f"{len(images) - k} of the {len(images)} images in the inputs have no image tokens in the ids"
        self._image_grids = None if problem else per
        self._image_grids_problem = problem

    # -- access ---------------------------------------------------------------------------------------------
    @property
    def batch_size(self) -> int:
        return next(iter(self._masks.values())).shape[0]

    @property
    def length(self) -> int:
        return next(iter(self._masks.values())).shape[1]

    @property
    def names(self) -> list[str]:
        return sorted(self._masks)

    def __contains__(self, name: str) -> bool:
        return name in self._masks

    def __getitem__(self, name: str) -> torch.Tensor:
        """The ``[batch, positions]`` mask of a group. Unions with ``|``: ``groups["image|context"]``."""
        if "|" in name:   # (a new tensor: the union of two or more groups)
            return self.window(name, 0, self.length)
        if name not in self._masks:
            raise GroupError(f"unknown token group {name!r}; this batch has {', '.join(self.names)}. "
                             "Add your own with groups.add(name, mask).")
        return self._masks[name]

    def mask(self, name: str, length: int | None = None, require_nonempty: bool = False) -> torch.Tensor:
        """Group mask padded with False (or cut) to ``length`` positions; optionally every sample must be non-empty."""
        m = self[name]
        if require_nonempty:
            empty = (~m.any(dim=1)).nonzero().flatten().tolist()
            if empty:
                ids = [self.sample_ids[i] for i in empty]
                raise GroupError(f"token group {name!r} is empty for sample(s) {ids}: nothing to select there. "
                                 "Check the prompt (does it contain that part?) or use another group.")
        if length is not None and length != m.shape[1]:
            if length < m.shape[1]:
                m = m[:, :length]
            else:
                m = torch.cat([m, torch.zeros(m.shape[0], length - m.shape[1], dtype=torch.bool)], dim=1)
        return m

    def window(self, name: str, start: int, stop: int) -> torch.Tensor:
        """``mask(name)[:, start:stop]`` (False past the groups' length), the union of ``|`` parts taken over the
        window alone: a decode step's one position costs one column, not the whole sequence."""
        end = max(start, min(stop, self.length))
        out = None
        for part in (p.strip() for p in name.split("|")):
            m = self[part][:, start:end]
            out = m if out is None else out | m
        if end < stop:
            out = torch.cat([out, torch.zeros(out.shape[0], stop - end, dtype=torch.bool)], dim=1)
        return out

    def positions(self, name: str, sample: int) -> list[int]:
        return self[name][sample].nonzero().flatten().tolist()

    def extend(self, n_new: int) -> None:
        """Append ``n_new`` generated positions (called by the lens at each decode step)."""
        if n_new <= 0:
            return
        b = self.batch_size
        # one block of each fill for every group (cat copies it): called at every decode step
        fills = {fill: torch.full((b, n_new), fill, dtype=torch.bool) for fill in (False, True)}
        for k, v in self._masks.items():
            self._masks[k] = torch.cat([v, fills[k in ("generated", "all")]], dim=1)

    def truncate(self, length: int) -> None:
        """Drop positions past ``length`` (a new generate() call restarts from the prompt)."""
        for k, v in self._masks.items():
            self._masks[k] = v[:, :length]

    def expand(self, repeats: int) -> "TokenGroups":
        """Each sample repeated ``repeats`` times in a row (batched sweeps, beam search)."""
        masks = {k: v.repeat_interleave(repeats, dim=0) for k, v in self._masks.items()}
        ids = [s for s in self.sample_ids for _ in range(repeats)]
        return self._like(masks, [i for i in range(self.batch_size) for _ in range(repeats)], sample_ids=ids)

    def tile(self, n: int) -> "TokenGroups":
        """The whole batch repeated ``n`` times one after the other (row j*b + i is sample i)."""
        masks = {k: torch.cat([v] * n, dim=0) for k, v in self._masks.items()}
        return self._like(masks, list(range(self.batch_size)) * n, sample_ids=self.sample_ids * n)

    def select(self, rows: Sequence[int]) -> "TokenGroups":
        masks = {k: v[list(rows)] for k, v in self._masks.items()}
        return self._like(masks, list(rows), sample_ids=[self.sample_ids[i] for i in rows])

    def to_dict(self) -> dict:
        """JSON-ready: per group, per sample, the list of positions; ``image_grids`` (and ``image_grids_problem``)
        where known."""
        d = {"prompt_length": self.prompt_length, "sample_ids": self.sample_ids,
             "groups": {k: [row.nonzero().flatten().tolist() for row in v] for k, v in self._masks.items()}}
        if self.image_grids is not None:
            d["image_grids"] = self.image_grids
        if self.image_grids_problem is not None:
            d["image_grids_problem"] = self.image_grids_problem
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> "TokenGroups":
        b = len(d["sample_ids"])
        length = max([d["prompt_length"]] + [p + 1 for g in d["groups"].values() for row in g for p in row])
        masks = {}
        for k, rows in d["groups"].items():
            m = torch.zeros(b, length, dtype=torch.bool)
            for i, pos in enumerate(rows):
                m[i, pos] = True
            masks[k] = m
        return cls(masks, prompt_length=d["prompt_length"], sample_ids=d["sample_ids"],
                   image_grids=d.get("image_grids"), image_grids_problem=d.get("image_grids_problem"))

    def __repr__(self) -> str:
        counts = ", ".join(f"{k}={int(v.sum())}" for k, v in sorted(self._masks.items()))
        return f"TokenGroups(batch={self.batch_size}, positions={self.length}, {counts})"
