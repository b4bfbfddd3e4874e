"""Use a meta-trained initialisation: rebuild it from its export, adapt it to a new task, predict.

    import dist_signmaml
    learner = dist_signmaml.load("runs/latest")                  # or RUN/model_best.safetensors
    adapted = learner.adapt(support_images, support_labels)      # the training inner loop, test_inner_steps steps
    probabilities = adapted.predict(query_images)                # [n, ways], columns in adapted.classes order

Images are uint8 arrays or tensors ([n, H, W, C] or [n, C, H, W], or one image), float tensors in [0, 1]
(torchvision's ToTensor), PIL images or image files; PIL images and files are converted and resized exactly as the
shard builder did (`shards.imagefolder.fit_image`). Every image is then normalised as in training,
(x / 255 - mean) / std with the train split's channel statistics stored in the export.

BatchNorm keeps no running statistics (see models/norm.py): by default every forward normalises with the
statistics of the batch it is given, which is how training, validation and `evaluate` score a task's queries
(transductive). Scoring query images one at a time therefore gives other probabilities than scoring them
together. `predict(..., batchnorm="support")` normalises queries with the statistics the support set had at each
BatchNorm layer instead: then an image's prediction does not depend on the other queries.
"""

from __future__ import annotations

import contextlib
import json
import warnings
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.func import functional_call

from dist_signmaml.algorithms.inner import adapt as inner_adapt
from dist_signmaml.algorithms.learner import BACKBONE_PREFIX, to_learner_names
from dist_signmaml.data.episode_loader import Normalizer
from dist_signmaml.models.norm import TaskBatchNorm2d

NORMALIZATION = "normalization"  # export metadata key: {"mean": [...], "std": [...]} of the train split (train.py)
BATCHNORM_MODES = ("query", "support")
CROPS = ("center", "stretch")  # as in shards.imagefolder


class InferenceError(ValueError):
    """Bad input to load / adapt / predict: the message names the file, argument or value and what was expected."""


# ---- images -> model input -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Preprocessing:
    """How images become model input: the training image shape, its normalisation and the builder's crop."""

    image_shape: tuple[int, int, int]  # H, W, C
    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop: str = "center"

    def __post_init__(self):
        channels = self.image_shape[2]
        if len(self.mean) != channels or len(self.std) != channels:
            raise InferenceError(f"normalisation has {len(self.mean)} means and {len(self.std)} stds for "
                                 f"{channels}-channel images")
        if self.crop not in CROPS:
            raise InferenceError(f"crop={self.crop!r} is invalid: expected one of {', '.join(CROPS)}")

    @property
    def mode(self) -> str:
        return "L" if self.image_shape[2] == 1 else "RGB"

    def pixels(self, images) -> np.ndarray:
        """Any accepted image input -> uint8 [n, H, W, C] of the training shape."""
        if isinstance(images, (np.ndarray, torch.Tensor)):
            return self._array_batch(images)
        if _is_single_image(images):
            images = [images]
        if not isinstance(images, Sequence) or isinstance(images, (str, bytes)):
            raise InferenceError(f"images: expected an array, a tensor or a list of images, got {type(images).__name__}")
        if not images:
            raise InferenceError("images: got none")
        return np.stack([self._one(item, f"image {i}") for i, item in enumerate(images)])

    def __call__(self, images) -> torch.Tensor:
        """Model input, float [n, C, H, W], with exactly the loader's arithmetic (data.episode_loader.Normalizer)."""
        return Normalizer(self.mean, self.std)(self.pixels(images))

    def _one(self, item, what: str) -> np.ndarray:
        from PIL import Image

        from shards.imagefolder import fit_image

        height, _, _ = self.image_shape
        if isinstance(item, (str, Path)):
            try:
                with Image.open(item) as image:
                    return fit_image(image, height, self.crop, self.mode)
            except (OSError, SyntaxError, ValueError) as error:  # PIL's errors for missing or undecodable files
                raise InferenceError(f"{str(item)!r}: cannot read the image ({type(error).__name__}: {error})") from None
        if isinstance(item, Image.Image):
            return fit_image(item, height, self.crop, self.mode)
        if isinstance(item, (np.ndarray, torch.Tensor)):
            array = self._array_batch(item, single=True)
            return array[0]
        raise InferenceError(f"{what}: expected a file path, a PIL image, an array or a tensor, got "
                             f"{type(item).__name__}")

    def _array_batch(self, images, single: bool = False) -> np.ndarray:
        """uint8 (or [0, 1] float) arrays/tensors of the training size: NHWC, NCHW, HWC, CHW or HW (grey)."""
        height, width, channels = self.image_shape
        array = images.detach().cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
        shape = tuple(array.shape)
        if shape[-3:] == (height, width, channels):
            layout = array
        elif shape[-3:] == (channels, height, width):
            layout = np.moveaxis(array, -3, -1)
        elif channels == 1 and shape[-2:] == (height, width):
            layout = array[..., None]
        else:
            raise InferenceError(f"images of shape {shape} do not match the training images ({height}x{width}, "
                                 f"{channels} channel(s)); pass PIL images or files to have them resized")
        if layout.ndim == 3:
            layout = layout[None]
        if layout.ndim != 4 or (single and len(layout) != 1):
            raise InferenceError(f"images of shape {shape}: expected one image or a batch of them")
        return _as_uint8(layout, shape)


def _is_single_image(item) -> bool:
    from PIL import Image

    return isinstance(item, (str, Path, Image.Image))


def _as_uint8(array: np.ndarray, shape) -> np.ndarray:
    if array.dtype == np.uint8:
        return np.ascontiguousarray(array)
    if np.issubdtype(array.dtype, np.floating):
        low, high = float(array.min()), float(array.max())
        if low < 0.0 or high > 1.0:
            raise InferenceError(f"float images of shape {shape} hold values in [{low:.3g}, {high:.3g}]: expected "
                                 f"pixels in [0, 1] (as torchvision's ToTensor gives) or uint8 0..255; the "
                                 f"training normalisation is applied here, do not normalise beforehand")
        return np.ascontiguousarray(np.rint(array * 255.0).astype(np.uint8))
    raise InferenceError(f"images of dtype {array.dtype}: expected uint8 pixels or floats in [0, 1]")


# ---- loading an export -----------------------------------------------------------------------------------------

def load(path: str | Path, *, weights: str = "best", device: str | torch.device | None = None,
         normalization=None, crop: str = "center") -> MetaTrainedModel:
    """Rebuild a trained MetaLearner (backbone, inner rule, step sizes fixed or learned, adapted parameters) from
    its export.

    path           a run directory (model_best.safetensors if it validated, else model.safetensors) or a
                   .safetensors file written by dist_signmaml.train
    weights        best | final, for a run directory
    device         default: CUDA when available, else CPU
    normalization  None: the statistics stored in the export. For exports written before they were stored: a
                   shard root (its train/index.json) or split directory it was trained on, or {"mean", "std"}
    crop           center | stretch: how PIL images and files are fitted to the training size (as `shards build`)
    """
    from dist_signmaml.config import ConfigError, TrainConfig
    from dist_signmaml.artifacts import read_metadata
    from dist_signmaml.evaluate import weights_file
    from dist_signmaml.artifacts import WeightsFileError
    from dist_signmaml.builders import build_learner, check_weights_fit

    try:
        file = weights_file(path, weights)
        metadata = read_metadata(file)
    except ValueError as error:  # evaluate's own input errors: no such run, unreadable file, no config stored
        raise InferenceError(str(error)) from None
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        # the tasks run one at a time here, so the rest of the training setup (compile, vmap) does not apply
        config = TrainConfig.from_options(**(dict(metadata["config"]) | {"task_parallel": "loop", "compile": False}))
    except ConfigError as error:
        raise InferenceError(f"{file}: {error}") from None
    if "image_shape" not in metadata:
        raise InferenceError(f"{file} does not record the image shape it was trained on; re-export it with a "
                             f"current dist_signmaml.train")
    image_shape = tuple(int(v) for v in metadata["image_shape"])
    mean, std = resolve_normalization(file, metadata, normalization, image_shape)
    try:
        check_weights_fit(config, image_shape, file)
        learner = build_learner(config, image_shape, device)
    except WeightsFileError as error:  # its message names the file
        raise InferenceError(str(error)) from None
    except ConfigError as error:
        raise InferenceError(f"{file}: {error}") from None
    load_export(learner, file)
    learner.to(device).eval()
    return MetaTrainedModel(learner, config, Preprocessing(image_shape, mean, std, crop), metadata, file)


def load_export(learner: torch.nn.Module, file: Path) -> None:
    """The exported tensors into the learner, named back by `learner.to_learner_names` (the export's naming rule):
    the backbone's and the learner's own (learned inner step sizes). Nothing the learner holds may be missing and
    nothing in the file may be left over, so a file and a config that do not belong together fail loudly."""
    from safetensors.torch import load_file

    own = learner.state_dict()
    state = to_learner_names(load_file(str(file)))
    unknown = sorted(name.removeprefix(BACKBONE_PREFIX) for name in set(state) - set(own))
    missing = sorted(name.removeprefix(BACKBONE_PREFIX) for name in set(own) - set(state))
    if unknown or missing:
        raise InferenceError(f"{file} does not fit the model its metadata describes: "
                             + "; ".join(part for part in (
                                 f"unexpected tensors {', '.join(unknown[:5])}" if unknown else "",
                                 f"missing tensors {', '.join(missing[:5])}" if missing else "") if part))
    for name, tensor in state.items():
        if tensor.shape != own[name].shape:
            raise InferenceError(f"{file}: tensor {name.removeprefix(BACKBONE_PREFIX)!r} has shape "
                                 f"{tuple(tensor.shape)}, the model expects {tuple(own[name].shape)}")
    learner.load_state_dict(state)


def resolve_normalization(file: Path, metadata: dict, given, image_shape) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) per channel: given explicitly, stored in the export, or, for older exports, read from the train
    split the run's config names when it is still there (with a warning)."""
    if given is None and NORMALIZATION in metadata:
        given = metadata[NORMALIZATION]
    elif given is None:
        trained_on = Path(metadata["config"].get("data", "")) / "train"
        if not (trained_on / "index.json").is_file():
            raise InferenceError(f"{file} was exported before the normalisation was stored with the weights and its "
                                 f"training data {str(trained_on)!r} is not here: pass the shard root it was trained "
                                 f"on (load(..., normalization=ROOT); predict --data ROOT)")
        warnings.warn(f"{file} stores no normalisation; using the statistics of {trained_on}, the split it was "
                      f"trained on", stacklevel=3)
        given = trained_on
    if isinstance(given, (str, Path)):
        return _split_statistics(Path(given), image_shape)
    if isinstance(given, dict):
        try:
            return tuple(float(v) for v in given["mean"]), tuple(float(v) for v in given["std"])
        except (KeyError, TypeError, ValueError):
            raise InferenceError(f"normalization={given!r}: expected {{'mean': [...], 'std': [...]}}") from None
    try:
        mean, std = given
        return tuple(float(v) for v in mean), tuple(float(v) for v in std)
    except (TypeError, ValueError):
        raise InferenceError(f"normalization={given!r}: expected a shard root, a split directory, "
                             f"{{'mean': [...], 'std': [...]}} or (mean, std)") from None


def _split_statistics(path: Path, image_shape) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The channel statistics of a split directory, or of the train split of a shard root."""
    split = path if (path / "index.json").is_file() else path / "train"
    if not (split / "index.json").is_file():
        raise InferenceError(f"normalization={str(path)!r}: neither it nor {split} holds an index.json (expected a "
                             f"shard root with train/ or a split directory)")
    raw = json.loads((split / "index.json").read_text())
    if tuple(raw.get("image_shape", ())) != tuple(image_shape):
        raise InferenceError(f"{split}: images of shape {raw.get('image_shape')}, the model was trained on "
                             f"{list(image_shape)}")
    return tuple(float(v) for v in raw["mean"]), tuple(float(v) for v in raw["std"])


# ---- adapting and predicting -------------------------------------------------------------------------------------

class MetaTrainedModel:
    """A meta-initialisation ready to adapt: the MetaLearner (backbone, rule, beta) plus how images are prepared."""

    def __init__(self, learner, config, preprocessing: Preprocessing, metadata: dict, file: Path):
        self.learner, self.config, self.preprocessing = learner, config, preprocessing
        self.metadata, self.file = metadata, Path(file)

    @property
    def ways(self) -> int:
        """Classes per task: the size of the classifier head, fixed by meta-training."""
        return self.config.ways

    @property
    def device(self) -> torch.device:
        return next(self.learner.parameters()).device

    def adapt(self, images, labels: Sequence[Hashable], *, steps: int | None = None) -> AdaptedModel:
        """Inner steps of the trained rule on a support set (`steps` default: the run's test_inner_steps), with
        the trained step sizes: the fixed beta, or the learned ones (steps past the trained ones reuse the last).

        `labels` may be any names (sorted to fix the order of the output columns) or 0..ways-1; there must be as
        many distinct labels as the head has ways. Runs `algorithms.inner.adapt`, the training inner loop.
        """
        labels = [label.item() if isinstance(label, (torch.Tensor, np.generic)) else label for label in labels]
        classes = sorted(set(labels))
        if len(classes) != self.ways:
            raise InferenceError(f"the support set has {len(classes)} classes, but {self.file} was meta-trained for "
                                 f"{self.ways}-way tasks: give exactly {self.ways}")
        steps = self.config.test_inner_steps if steps is None else steps
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
            raise InferenceError(f"steps={steps!r} is invalid: expected an integer >= 0")
        support_x = self.preprocessing(images).to(self.device)
        if len(support_x) != len(labels):
            raise InferenceError(f"{len(support_x)} support images but {len(labels)} labels")
        support_y = torch.tensor([classes.index(label) for label in labels], device=self.device)
        learner = self.learner
        with torch.no_grad():
            params = inner_adapt(learner.model, dict(learner.model.named_parameters()), support_x, support_y,
                                 rule=learner.rule, steps=steps, lr=learner.step_sizes(), differentiate_through=False,
                                 adapted_names=learner.adapted_names)
        return AdaptedModel(self, {name: p.detach() for name, p in params.items()}, classes, support_x)


class AdaptedModel:
    """The backbone with weights adapted to one task; `classes[i]` is the label of output column i."""

    def __init__(self, parent: MetaTrainedModel, params: dict[str, torch.Tensor], classes: list, support_x):
        self.parent, self.params, self.classes = parent, params, classes
        self._support_x = support_x
        self._support_statistics: dict[TaskBatchNorm2d, tuple[torch.Tensor, torch.Tensor]] | None = None

    def logits(self, images, *, batchnorm: str = "query", chunk: int = 256) -> torch.Tensor:
        """Logits [n, ways] on the device. batchnorm="query": the images are one batch, its statistics normalise
        it (training's convention); "support": every BatchNorm uses the support set's statistics, scored `chunk`
        images at a time (the result does not depend on the batch)."""
        if batchnorm not in BATCHNORM_MODES:
            raise InferenceError(f"batchnorm={batchnorm!r} is invalid: expected one of {', '.join(BATCHNORM_MODES)}")
        x = self.parent.preprocessing(images).to(self.parent.device)
        model = self.parent.learner.model
        with torch.no_grad():
            if batchnorm == "query":
                return functional_call(model, self.params, (x,))
            statistics = self.support_statistics()
            with _batchnorm_with(statistics):
                return torch.cat([functional_call(model, self.params, (part,)) for part in x.split(chunk)])

    def predict(self, images, *, batchnorm: str = "query") -> torch.Tensor:
        """Class probabilities [n, ways] (float32, CPU); column i is `classes[i]`."""
        return torch.softmax(self.logits(images, batchnorm=batchnorm).float(), dim=-1).cpu()

    def predict_classes(self, images, *, batchnorm: str = "query") -> list:
        """The most likely class of each image (argmax of the logits, as evaluate's accuracy counts it)."""
        return [self.classes[i] for i in self.logits(images, batchnorm=batchnorm).argmax(-1).tolist()]

    def support_statistics(self) -> dict:
        """Per BatchNorm layer, the mean and (biased) variance of its input over the support set, with the adapted
        weights: what the support set was normalised with during adaptation."""
        if self._support_statistics is None:
            model = self.parent.learner.model
            layers = [m for m in model.modules() if isinstance(m, TaskBatchNorm2d)]
            if any(isinstance(m, torch.nn.modules.batchnorm._NormBase) for m in model.modules()):
                raise InferenceError("batchnorm='support' needs the backbone's TaskBatchNorm2d layers only")
            statistics = {}

            def record(module, args):
                x = args[0].float()
                statistics[module] = (x.mean(dim=(0, 2, 3)), x.var(dim=(0, 2, 3), unbiased=False))

            handles = [layer.register_forward_pre_hook(record) for layer in layers]
            try:
                with torch.no_grad():
                    functional_call(model, self.params, (self._support_x,))
            finally:
                for handle in handles:
                    handle.remove()
            self._support_statistics = statistics
        return self._support_statistics


@contextlib.contextmanager
def _batchnorm_with(statistics: dict):
    """Every TaskBatchNorm2d in `statistics` normalises with the given (mean, var) instead of its batch's. The
    layer's own (adapted) weight and bias are read inside the functional call, where they are the adapted ones."""

    def normalise(module, args, output):
        mean, var = statistics[module]
        shape = (1, -1, 1, 1)
        x = args[0].float()
        y = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + module.eps)
        return (y * module.weight.float().view(shape) + module.bias.float().view(shape)).to(output.dtype)

    handles = [module.register_forward_hook(normalise) for module in statistics]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
