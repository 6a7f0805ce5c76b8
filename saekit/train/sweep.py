"""Several dictionaries trained on the same batches, in one pass over the data: a sweep.

Reading, shuffling and batching the data often cost as much as a small dictionary's step, and
a sweep over k, width, learning rate or kinds would pay them once per member. Here the members
(each a `Minibatch` trainer with its own model, optimizer, counters and history) share one
stream: each batch is read once and given to every member in turn. Every member's state holds
the stream's position, so each can be saved and resumed like a single run.
"""

from collections.abc import Callable

from .. import distributed
from ..errors import UserError
from .control import StepBoundaryStop, progress_bar
from .minibatch import Minibatch


class Sweep:
    def __init__(self, members: list[Minibatch]):
        if not members:
            raise UserError("a sweep needs at least one member.")
        self.members, self.stream = members, members[0].stream
        if any(m.stream is not self.stream for m in members):
            raise UserError("the members of a sweep must read one stream (build them with stream=...).")
        steps = {m.step for m in members}
        if len(steps) != 1:
            raise UserError(f"the members of a sweep must start at the same step (they are at {sorted(steps)}).")
        self.total_steps = members[0].total_steps

    @property
    def step(self) -> int:
        return self.members[0].step

    def run(
        self,
        progress: bool = True,
        checkpoint: Callable[[], None] | None = None,
        on_rows: list[Callable[[dict], None] | None] | None = None,
    ) -> bool:
        """Train every member to total_steps on the shared batches, calling checkpoint() every
        checkpoint_every steps and on_rows[i](row) with member i's history rows. Returns interrupted."""
        on_rows = on_rows or [None] * len(self.members)
        for member in self.members:
            member.start()
        every = self.members[0].optim.checkpoint_every
        batches = iter(self.stream)
        show = progress and distributed.is_main()
        with progress_bar(self.total_steps, "sweep", show) as bar, StepBoundaryStop() as stop:
            bar.update(self.step)
            while self.step < self.total_steps and not stop.requested:
                batch = next(batches)
                for member, on_row in zip(self.members, on_rows):
                    member.train_on(batch, on_row)
                bar.update(1)
                if checkpoint is not None and self.step % every == 0:
                    checkpoint()
        for member in self.members:
            member.model.eval()
        return stop.requested
