"""Small periodic hooks of the training loop: when to act, and progress with throughput and ETA.

clu's `periodic_actions` would do this but imports TensorFlow, which this project does not
install.
"""

import dataclasses
import time
from collections.abc import Callable


def is_due(step: int, every_steps: int, last_step: int) -> bool:
    """Return True at each multiple of `every_steps` and at the last step; never if <= 0."""
    if every_steps <= 0:
        return False
    return step % every_steps == 0 or step == last_step


@dataclasses.dataclass
class Progress:
    """Measures throughput between two reports and the share of time spent waiting for data.

    Call `add_data_wait(seconds)` after each batch is fetched, `exclude(seconds)` after work
    that is not training (checkpoints, pictures) and `report(step)` at logging steps. Time
    before `start(step)` (compilation) counts towards no interval.
    """

    total_steps: int  # Last step of the run.
    global_batch_size: int  # Images per step over all devices.
    num_devices: int  # Devices of the mesh.
    train_flops_per_image: int | None = None  # Analytic FLOPs of one training step per image.
    peak_flops_per_device: float | None = None  # Dense bfloat16 peak FLOP/s of one device.
    clock: Callable[[], float] = time.perf_counter  # Seconds; replaceable in tests.

    def __post_init__(self):
        self._last_step = None
        self._last_time = None
        self._data_wait = 0.0
        self._excluded = 0.0

    def start(self, step: int) -> None:
        """Set the origin of the first interval to `step`, now."""
        self._last_step = step
        self._last_time = self.clock()
        self._data_wait = 0.0
        self._excluded = 0.0

    def add_data_wait(self, seconds: float) -> None:
        """Count `seconds` spent blocked on the input pipeline in the current interval."""
        self._data_wait += seconds

    def exclude(self, seconds: float) -> None:
        """Leave `seconds` of the current interval out of the throughput measures."""
        self._excluded += seconds

    def report(self, step: int) -> dict[str, float]:
        """Return throughput measures of the interval that ends at `step`, and start the next one.

        Keys: steps_per_sec, images_per_sec (global), images_per_sec_per_device,
        data_wait_share (0..1), eta_seconds, and with FLOP counts tflops_per_sec_per_device and
        mfu (0..1, only when the device's peak is known).
        """
        if self._last_step is None:
            raise RuntimeError("Progress.report called before Progress.start.")
        now = self.clock()
        seconds = max(now - self._last_time - self._excluded, 1e-9)
        steps = step - self._last_step

        measures = {"data_wait_share": min(self._data_wait / seconds, 1.0)}
        if steps > 0:
            steps_per_sec = steps / seconds
            images_per_sec = steps_per_sec * self.global_batch_size
            measures["steps_per_sec"] = steps_per_sec
            measures["images_per_sec"] = images_per_sec
            measures["images_per_sec_per_device"] = images_per_sec / self.num_devices
            measures["eta_seconds"] = (self.total_steps - step) / steps_per_sec
            if self.train_flops_per_image:
                flops_per_device = images_per_sec * self.train_flops_per_image / self.num_devices
                measures["tflops_per_sec_per_device"] = flops_per_device / 1e12
                if self.peak_flops_per_device:
                    measures["mfu"] = flops_per_device / self.peak_flops_per_device

        self._last_step = step
        self._last_time = now
        self._data_wait = 0.0
        self._excluded = 0.0
        return measures


def format_duration(seconds: float) -> str:
    """Format `seconds` as `1d02h03m`, `2h03m04s`, `3m04s` or `4s`."""
    seconds = int(round(seconds))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours:02d}h{minutes:02d}m"
    if hours:
        return f"{hours}h{minutes:02d}m{secs:02d}s"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"
