"""The two TorchPINN reconstructors: PINN (physics-informed, unsupervised) and Supervised.

Both infer the same way (a trained generator predicts object patches, the engine stitches them
at their absolute positions) and differ in how they train. Inference streams one
``ReconstructOutput`` per chunk of groups, with ``progress`` = chunks done and
``get_progress_goal()`` = number of chunks, so the progress bar moves, the image fills in, and
Stop takes effect between chunks (the host's Stop flag is also polled before every chunk).
Training runs the engine in a helper thread and yields one ``TrainOutput`` per epoch; closing
the generator (Stop) cancels training within one batch, and the weights ``FinalWeights``
chooses among the finished epochs (the best, by default) are kept.

Nothing here imports torch at module import: :func:`require_backend` runs first in every
piece of work.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ptychodus.api.reconstruct import (
    ReconstructInput,
    ReconstructOutput,
    TrainableReconstructor,
    TrainOutput,
)

from .backend import require_backend
from .convert import (
    canvas_for,
    find_training_data,
    losses_from_history,
    reconstruct_input_to_data,
    result_probes,
    stitched_to_object,
    validation_losses,
    with_object,
)
from .names import (
    ARCHIVE_NAME,
    LOGGER_NAME,
    MODEL_FILE_EXTENSION,
    MODEL_FILE_FILTER,
    TRAINING_DATA_FILE_FILTER,
)
from .saving import check_not_replacing, keep_earlier_archive, save_trained_model

if TYPE_CHECKING:
    from .library import TorchPINNLibrary

_DONE = object()
_POLL_SECONDS = 0.25


#: At most this many images per run. Ptychodus's batch mode saves every product handed over
#: (the whole object, uncompressed) as ``OUT/product.NNNNNN.h5``: one per chunk wrote 79
#: copies for a 20,000-pattern scan. The GUI needs no more to show progress, and Stop is still
#: polled before every chunk.
MAX_SNAPSHOTS = 10


def _shown(index: int, n_chunks: int) -> bool:
    """Whether chunk ``index``'s image is handed over: the last, and one per tenth of the run."""
    return index == n_chunks - 1 or (index + 1) * MAX_SNAPSHOTS // n_chunks > (
        index * MAX_SNAPSHOTS // n_chunks
    )


class TorchPINNReconstructor(TrainableReconstructor):
    """One TorchPINN reconstructor; ``mode`` is the engine's training mode."""

    def __init__(self, name: str, mode: str, library: TorchPINNLibrary) -> None:
        super().__init__()
        self._name = name
        self._mode = mode
        self._library = library
        self._logger = logging.getLogger(f"{LOGGER_NAME}.host.{name.casefold()}")
        self._goal = 0
        #: Chunks predicted by the last reconstruct() (0-based indexes), for diagnostics.
        self.chunks_run: list[int] = []

    @property
    def name(self) -> str:
        return self._name

    @property
    def mode(self) -> str:
        return self._mode

    def get_progress_goal(self) -> int:
        """Chunks of the running inference, epochs of the running training.

        Ptychodus asks before the work starts (then the configured epochs are the best guess)
        and again after every yield, when the exact value is known.
        """
        return self._goal if self._goal > 0 else self._library.settings.epochs.get_value()

    def _logged(self, what: str, work: Iterator[Any]) -> Iterator[Any]:
        """``work``'s items, with any error it raises also logged on the library's logger.

        Why: Ptychodus shows our logger in its log pane, but an exception out of ``train`` or
        ``reconstruct`` only reaches its task manager's log (a traceback on the terminal), so
        without this the user would see a run end without a word. Closing (Stop) is not an
        error and is not logged.
        """
        try:
            yield from work
        except Exception as exc:
            self._logger.error("%s %s failed: %s", self._name, what, exc)
            raise

    # ------------------------------------------------------------------ inference
    def reconstruct(self, parameters: ReconstructInput) -> Iterator[ReconstructOutput]:
        return self._logged("inference", self._reconstruct(parameters))

    def _reconstruct(self, parameters: ReconstructInput) -> Iterator[ReconstructOutput]:
        require_backend()
        from ..engine.inference import reconstruct_iter

        # the scan first: its refusals (a stale bad-pixel mask, NaN counts) need no model
        data = reconstruct_input_to_data(parameters, with_object=False)
        model = self._library.model_slot.get()
        payload = model.inference_payload(self._library.settings.inference_overrides())
        template = parameters.product.object_
        losses = losses_from_history(model.history)
        probes = result_probes(parameters.product, model)
        groups = payload.inference.n_groups or data.n_patterns
        self._goal = max(1, math.ceil(groups / payload.inference.chunk_size))
        self.chunks_run = []
        self._logger.info(
            "%s inference: %d patterns of %d px into a %d x %d px object, chunks of %d groups",
            self._name,
            data.n_patterns,
            data.N,
            template.width_px,
            template.height_px,
            payload.inference.chunk_size,
        )
        chunks = reconstruct_iter(
            model,
            data,
            payload,
            canvas=canvas_for(template, data),
            should_stop=self._library.is_stopping,
        )

        def output(chunk: Any) -> ReconstructOutput:
            product = with_object(
                parameters.product, stitched_to_object(chunk.stitched, template), losses, probes
            )
            return ReconstructOutput(product=product, progress=chunk.chunk_index + 1)

        unshown = None  # the latest chunk's image, when not yet handed over
        try:
            for chunk in chunks:
                self.chunks_run.append(chunk.chunk_index)
                self._goal = chunk.n_chunks
                self._logger.debug(
                    "chunk %d/%d: %d/%d groups",
                    chunk.chunk_index + 1,
                    chunk.n_chunks,
                    chunk.groups_done,
                    chunk.groups_total,
                )
                if _shown(chunk.chunk_index, chunk.n_chunks):
                    unshown = None
                    yield output(chunk)
                else:
                    unshown = chunk
            if unshown is not None:  # stopped early: hand over the image made so far
                yield output(unshown)
        finally:
            chunks.close()
            self._goal = 0

    # ------------------------------------------------------------------ model files
    def is_model_loaded(self) -> bool:
        return self._library.model_slot.is_loaded()

    def get_model_file_filter(self) -> str:
        return MODEL_FILE_FILTER

    def get_model_file_extension(self) -> str:
        return MODEL_FILE_EXTENSION

    def load_model_from_file(self, file_path: Path) -> None:
        training = self._library.training_now()
        if training is not None:  # its model would replace this one when it ends
            message = (
                f"a TorchPINN training is running ({training}): the model it trains is loaded "
                f"when it ends, replacing {Path(file_path).name}; load the model after it, or "
                "stop it first"
            )
            self._logger.error("cannot load model archive %s: %s", file_path, message)
            raise RuntimeError(message)
        try:
            self._library.model_slot.select(Path(file_path))
        except Exception as exc:
            self._logger.error("cannot load model archive %s: %s", file_path, exc)
            raise

    def save_model(self, file_path: Path) -> None:
        self._library.model_slot.save_copy(Path(file_path))

    # ------------------------------------------------------------------ training data
    def get_training_data_file_filter(self) -> str:
        return TRAINING_DATA_FILE_FILTER

    def export_training_data(self, file_path: Path, parameters: ReconstructInput) -> None:
        from ..engine.data import save_npz

        path = Path(file_path)
        if path.suffix.casefold() != ".npz":
            path = path.with_name(path.name + ".npz")
            check_not_replacing(Path(file_path), path)
        data = reconstruct_input_to_data(parameters, with_object=True)
        save_npz(data, path)
        self._logger.info("training data written to %s (%d patterns)", path, data.n_patterns)

    # ------------------------------------------------------------------ training
    def train(self, input_path: Path, output_path: Path) -> Iterator[TrainOutput]:
        return self._logged("training", self._train(input_path, output_path))

    def _train(self, input_path: Path, output_path: Path) -> Iterator[TrainOutput]:
        require_backend()
        with self._library.training_run(f"{self._name}, started by Ptychodus's Train"):
            yield from self._train_now(Path(input_path), Path(output_path))

    def _train_now(self, input_path: Path, output_path: Path) -> Iterator[TrainOutput]:
        from ..engine.payload import create_training_payload
        from ..engine.training import CancelToken
        from ..engine.training import train as engine_train

        data, test_data, description = find_training_data(Path(input_path))
        settings = self._library.settings
        payload = create_training_payload(settings.training_overrides(self._mode, data.N))
        epochs = payload.training.epochs
        self._goal = epochs
        self._logger.info(
            "%s training on %s: %d patterns of %d px, gridsize %d, %d epochs, accelerator %s",
            self._name,
            description,
            data.n_patterns,
            data.N,
            payload.grid.gridsize,
            epochs,
            payload.execution.accelerator,
        )
        records: queue.Queue[Any] = queue.Queue()
        token = CancelToken()
        outcome: dict[str, Any] = {}

        class _Observer:
            def on_epoch_end(self, record: Any) -> None:
                records.put(record)

        def run() -> None:
            try:
                outcome["result"] = engine_train(
                    payload, data, test_data=test_data, observer=_Observer(), cancel=token
                )
            except BaseException as exc:  # handed to the generator, re-raised there
                outcome["error"] = exc
            finally:
                records.put(_DONE)

        worker = threading.Thread(target=run, name="torchpinn-train", daemon=True)
        worker.start()
        history: list[Any] = []
        finished = False
        try:
            while True:
                try:
                    item = records.get(timeout=_POLL_SECONDS)
                except queue.Empty:
                    if self._library.is_stopping():
                        token.cancel()
                    continue
                if item is _DONE:
                    break
                history.append(item)
                self._library.report_epoch(self._name, item)
                self._logger.info(
                    "epoch %d/%d: loss %.6g%s",
                    item.epoch,
                    epochs,
                    item.train_loss,
                    "" if item.val_loss is None else f", validation {item.val_loss:.6g}",
                )
                yield TrainOutput(
                    training_loss=losses_from_history(history),
                    validation_loss=validation_losses(history),
                    progress=item.epoch,
                )
            finished = True
        finally:
            if not finished:  # closed by the host (Stop) or an error: stop within one batch
                token.cancel()
            worker.join()
            self._goal = 0
            # A finished run reports its errors; a stopped one keeps what it has and logs.
            self._finish_training(outcome, Path(output_path), epochs, raise_errors=finished)

    def _finish_training(
        self, outcome: dict[str, Any], output_path: Path, epochs: int, *, raise_errors: bool
    ) -> None:
        """Save and load the (best) model; a stopped run keeps what it has and says so."""
        error = outcome.get("error")
        if error is not None:
            if raise_errors:
                raise error
            self._logger.error("training failed: %s", error)
            return
        result = outcome.get("result")
        if result is None:
            return
        if not result.history:
            self._logger.warning(
                "training stopped before the first epoch finished: no model was saved"
            )
            return
        try:
            target = keep_earlier_archive(output_path / ARCHIVE_NAME)
            saved = save_trained_model(result.model, target)
        except Exception as exc:
            if raise_errors:
                raise
            self._logger.error("the trained model is lost: %s", exc)
            return
        file = saved.file
        if saved.problem is not None:  # a read-only or full output folder: not lost, moved
            self._logger.error(
                "%s; it is loaded now: the TorchPINN panel's Save model as... copies it where "
                "you want it",
                saved.problem,
            )
        self._library.model_slot.adopt(result.model, file)
        self._library.on_model_trained(file)
        if result.divergence is not None:
            self._logger.warning(
                "training diverged after %d of %d epochs (%s): kept %s, saved to %s and loaded; %s",
                len(result.history),
                epochs,
                result.divergence,
                result.model.kept_weights(result.best_epoch),
                file,
                result.divergence.advice,
            )
        elif result.cancelled:
            self._logger.warning(
                "training stopped after %d of %d epochs: kept %s, saved to %s and loaded",
                len(result.history),
                epochs,
                result.model.kept_weights(result.best_epoch),
                file,
            )
        else:
            self._logger.info(
                "training finished (%d epochs, %s): model saved to %s and loaded",
                len(result.history),
                result.model.kept_weights(result.best_epoch),
                file,
            )
