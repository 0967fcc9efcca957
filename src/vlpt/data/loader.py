"""Training batches of a set read into memory as a pure function of the step: batch k is the same whatever
happened before it, so resuming at step k needs no saved iterator state (streamed shards: streaming.py)."""
from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset

from vlpt.data.dataset import ImageTextSet, to_uint8
from vlpt.data.tokenizer import TextTokenizer
from vlpt.data.views import TextViews
from vlpt.typed import ConfigError

MAX_REDRAWS = 10  # per slot; a batch this unlucky ends the run through data.max_bad_fraction anyway


class StepBatches(Dataset):
    """Item k = this rank's share of global batch k.

    Uniform sources: a fresh seeded permutation of the captions each epoch, cut into global batches
    (the last incomplete one dropped). Weighted mixtures: each global batch drawn with replacement by the
    weights, seeded by the step. With `images` (every image decoded once, uint8 [N,3,S,S]) a batch is an
    index; without, images are decoded here (in DataLoader workers): an unreadable image is named in `bad`
    and its slot redrawn (seeded by seed, step, rank), so batches keep their size, which the all-gathers
    of contrastive losses and the micro-batch split need. With active `text_views` the captions of the
    batch go through them and `tokenizer` here: "text" [B,L] and, with extra views, "text_views" [V,B,L].
    """

    def __init__(
        self,
        data: ImageTextSet,
        tokens: torch.Tensor,
        batch_size: int,
        seed: int,
        image_size: int,
        images: torch.Tensor | None = None,
        weights: torch.Tensor | None = None,
        rank: int = 0,
        world: int = 1,
        text_views: TextViews | None = None,
        tokenizer: TextTokenizer | None = None,
        num_workers: int = 0,
        pin_memory: bool = False,
    ):
        # the loop checks these with the fix named (train/data.py, loop.check_batch_split)
        assert weights is not None or len(data) >= batch_size, "an epoch must hold at least one batch"
        assert batch_size % world == 0, "every process takes an equal share of the batch"
        self.data, self.tokens, self.images, self.weights = data, tokens, images, weights
        self.caption_image = torch.tensor(data.caption_image)
        self.batch_size, self.seed, self.size, self.rank, self.world = batch_size, seed, image_size, rank, world
        self.steps_per_epoch = len(data) // batch_size
        self._perm_epoch, self._perm = -1, None
        self.text_views = text_views if text_views is not None and text_views.active else None
        self.tokenizer = tokenizer
        self.num_workers, self.pin_memory = num_workers, pin_memory

    def __len__(self) -> int:  # effectively unbounded; the loop asks for the steps it runs
        return 2**62

    def global_indices(self, step: int) -> torch.Tensor:
        if self.weights is not None:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
            return torch.multinomial(self.weights, self.batch_size, replacement=True, generator=g)
        epoch, j = divmod(step, self.steps_per_epoch)
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm, self._perm_epoch = torch.randperm(len(self.data), generator=g), epoch
        return self._perm[j * self.batch_size : (j + 1) * self.batch_size]

    def __getitem__(self, step: int) -> dict:
        local = self.batch_size // self.world
        idx = self.global_indices(step)[self.rank * local : (self.rank + 1) * local]
        img_idx = self.caption_image[idx]
        if self.images is not None:
            return {"image": self.images[img_idx], **self.texts(idx, step), "bad": []}
        images, keep, bad, redraw = [], [], [], None
        for c in idx.tolist():
            for _ in range(MAX_REDRAWS + 1):
                i = int(self.caption_image[c])
                try:
                    images.append(to_uint8(self.data.load(self.data.images[i]), self.size))
                    keep.append(c)
                    break
                except Exception as e:  # unreadable image: counted by the loop, slot redrawn
                    bad.append(f"{self.data.images[i]} ({type(e).__name__}: {e})")
                    if redraw is None:  # a stream of its own, apart from the batch order's
                        redraw = torch.Generator().manual_seed((self.seed * 1_000_003 + step) * 1_009 + self.rank + 1)
                    c = self._draw(redraw)
        image = torch.stack(images) if images else torch.empty(0, 3, self.size, self.size, dtype=torch.uint8)
        return {"image": image, **self.texts(torch.tensor(keep, dtype=torch.long), step), "bad": bad}

    def texts(self, idx: torch.Tensor, step: int) -> dict[str, torch.Tensor]:
        """Token ids of captions `idx` as objectives read them: through the text views, if any."""
        if self.text_views is None:
            return {"text": self.tokens[idx]}
        main, extra = self.text_views([self.data.captions[i] for i in idx.tolist()], step)
        out = {"text": self.tokens[idx] if main is None else self.tokenizer(main)}
        if extra:
            out["text_views"] = torch.stack([self.tokenizer(e) for e in extra])
        return out

    def _draw(self, g: torch.Generator) -> int:
        if self.weights is not None:
            return int(torch.multinomial(self.weights, 1, generator=g))
        return int(torch.randint(len(self.data), (1,), generator=g))


    def iterate(self, start: int, stop: int):
        """Batches for steps start .. stop - 1, decoded in `num_workers` DataLoader workers."""
        loader = DataLoader(self, sampler=range(start, stop), batch_size=None, num_workers=self.num_workers,
                            pin_memory=self.pin_memory, persistent_workers=False,
                            prefetch_factor=4 if self.num_workers else None,
                            # its own generator: iter(DataLoader) draws the workers' base seed from it, which
                            # would otherwise be the global one, where it would shift what a resumed run's
                            # dropout draws (text_views.dropout)
                            generator=torch.Generator().manual_seed(self.seed))
        return iter(loader)

    def state_dict(self) -> dict:  # the step alone is the position
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
