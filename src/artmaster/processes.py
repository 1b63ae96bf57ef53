"""Generation split across processes for the `augment` and `evaluate` stages.

`accelerate launch --num_processes N -m artmaster.augment` (or `artmaster.evaluate`) starts one
process per GPU; each paints a contiguous share of the stage's samples, and the main process
gathers the results and alone writes the outputs and logs to MLflow. Started plainly (`artmaster
augment`, `dvc repro`) it is one process and nothing is split. An image depends only on its prompt
and seed (`generate.generate_images`), so the split never changes what is painted.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from typing import TypeVar

from omegaconf import DictConfig

Item = TypeVar("Item")
log = logging.getLogger(__name__)


class Processes:
    """This process's place among those `accelerate launch` started (one when run plainly)."""

    def __init__(self, model_cfg: DictConfig):
        from accelerate import PartialState

        from artmaster.models import resolve_device

        # the same device rule as the pipeline's; on GPUs PartialState makes cuda:<local rank>
        # the current device, which is where `load_pipeline`'s "cuda" then puts the model
        self.state = PartialState(cpu=resolve_device(model_cfg) == "cpu")

    @property
    def count(self) -> int:
        return self.state.num_processes

    @property
    def index(self) -> int:
        return self.state.process_index

    @property
    def is_main(self) -> bool:
        return self.state.is_main_process

    def share(self, items: Sequence[Item], stage: str) -> list[Item]:
        """This process's contiguous slice of `items`; slices differ in length by at most one."""
        size, extra = divmod(len(items), self.count)
        start = self.index * size + min(self.index, extra)
        mine = list(items[start : start + size + (self.index < extra)])
        if self.count > 1:
            log.info("%s: process %d of %d paints samples %d to %d of %d",
                     stage, self.index, self.count, start, start + len(mine) - 1, len(items))
        return mine

    def gather(self, mine: Sequence[Item]) -> list[Item]:
        """Every process's `share` results, concatenated in process order: the order of the items
        `share` split. Every process must call it."""
        if self.count == 1:
            return list(mine)
        from accelerate.utils import gather_object

        return gather_object(list(mine))

    def wait(self) -> None:
        """Block until every process gets here."""
        self.state.wait_for_everyone()


def launch_command(module: str, processes: int, port: int | None = None) -> list[str]:
    """The argv that starts `python -m <module>` (a stage) in `processes` processes on this machine
    through `accelerate launch`; `port`: the rendezvous port (accelerate's default when None)."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    if port is not None:
        command += ["--main_process_port", str(port)]
    return [*command, "-m", module]
