"""A second device simulated on the CPU, to find code that would mix devices on a GPU without having one.

Inside :func:`simulated_device`, a tensor on the device ``meta`` is a :class:`OnDevice`: it reports ``meta`` as its
device but holds real CPU data, so code runs to the end and computes real numbers. Every operation that mixes an
``OnDevice`` tensor with a plain CPU tensor of one or more dimensions raises :class:`DeviceMismatch`, where CUDA
raises "Expected all tensors to be on the same device". What CUDA allows is allowed: a 0-dim CPU tensor (a scalar) as
an input of an elementwise operation beside device tensors (not as its output, nor for ``index_select`` and the other
non-elementwise ones), and CPU index tensors indexing a device tensor (a device index into a CPU tensor is refused).
Factories given ``device=x.device`` (``torch.zeros``, ``torch.tensor``, ``x.new_*``, ``.to(x.device)``) make device
tensors; ``.cpu()`` / ``.to("cpu")`` give back plain ones; ``.numpy()`` of a device tensor raises as a CUDA tensor's
does. A model moved with ``model.to("meta")`` inside the context keeps its weights, tied ones tied.

``simulated_device(float64=False)`` simulates a device without float64 arithmetic, as Apple's GPUs (``mps``) are: an
operation that would leave a float64 tensor on the device raises the ``TypeError`` torch raises there. entrorl moves
float64 statistics to the CPU on the device types of ``entrorl._checks.DEVICES_WITHOUT_FLOAT64``, which a test adds
``meta`` to.
"""

from __future__ import annotations

import contextlib
import functools

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_flatten, tree_map

DEVICE = torch.device("meta")

# operations that move or alias data between devices, which CUDA allows across them
_MOVES = ("aten._to_copy", "aten.copy_", "aten.lift_fresh", "aten.detach", "aten._has_compatible_shallow_copy_type",
          "aten.set_")
_INDEXING = ("aten.index.Tensor", "aten.index_put", "aten._index_put_impl")
NO_FLOAT64_MESSAGE = ("Cannot convert a MPS Tensor to float64 dtype as the MPS framework doesn't support float64. Please "
                      "use float32 instead.")
_settings = {"float64": True}


class DeviceMismatch(RuntimeError):
    """An operation mixed a device tensor with a CPU tensor of one or more dimensions."""


class OnDevice(torch.Tensor):
    """A tensor on the simulated device: its data, a plain CPU tensor, is ``self.data_on_cpu``."""

    @staticmethod
    def __new__(cls, data: torch.Tensor, requires_grad: bool = False):
        tensor = torch.Tensor._make_wrapper_subclass(cls, data.shape, strides=data.stride(),
                                                     storage_offset=data.storage_offset(), dtype=data.dtype,
                                                     device=DEVICE, requires_grad=requires_grad)
        tensor.data_on_cpu = data
        return tensor

    def tolist(self):
        return self.data_on_cpu.tolist()

    def data_ptr(self) -> int:  # distinct for distinct live tensors, as on CUDA (code compares addresses)
        return self.data_on_cpu.data_ptr()

    def __reduce_ex__(self, protocol):  # saved as its data, as torch.load(map_location="cpu") reads a CUDA tensor
        if isinstance(self, torch.nn.Parameter):
            return torch.nn.Parameter(self.data_on_cpu.detach(), requires_grad=self.requires_grad).__reduce_ex__(protocol)
        return self.data_on_cpu.detach().requires_grad_(self.requires_grad).__reduce_ex__(protocol)

    def __copy__(self):  # on the device, sharing the data and the attributes, as a CUDA tensor's shallow copy
        copied = OnDevice(self.data_on_cpu, requires_grad=self.requires_grad)
        if isinstance(self, torch.nn.Parameter):
            copied = torch.nn.Parameter(copied, requires_grad=self.requires_grad)
        copied.__dict__.update({key: value for key, value in self.__dict__.items() if key != "data_on_cpu"})
        return copied

    def numpy(self, *args, **kwargs):
        raise TypeError("can't convert cuda:0 device type tensor to numpy. Use Tensor.cpu() to copy the tensor to "
                        "host memory first.")

    def __repr__(self) -> str:
        return f"OnDevice({self.data_on_cpu!r})"

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        return _run(func, args, kwargs or {})


def _names_the_device(device) -> bool:
    return device is not None and torch.device(device) == DEVICE


def _written_arguments(func, args, kwargs) -> list[torch.Tensor]:
    """The tensors ``func`` writes into: in-place operations' ``self``, ``out=`` arguments."""
    schema = getattr(func, "_schema", None)
    if schema is None:
        return []
    written = []
    for index, argument in enumerate(schema.arguments):
        if argument.alias_info is None or not argument.alias_info.is_write:
            continue
        value = args[index] if index < len(args) and not argument.kwarg_only else kwargs.get(argument.name)
        written += [item for item in tree_flatten(value)[0] if isinstance(item, torch.Tensor)]
    return written


# operations whose argument at this position may be a 0-dim CPU tensor (read as a number) beside device tensors
_SCALAR_ARGUMENT = {"aten.masked_fill": 2, "aten.index_put": 2, "aten._index_put_impl": 2, "aten.fill": 1}


def _cpu_scalars_allowed(func, args) -> list[torch.Tensor]:
    """The inputs of ``func`` that CUDA lets be 0-dim CPU tensors beside device tensors: every input of an
    elementwise operation (its TensorIterator reads them as numbers), the value of ``masked_fill``, ``index_put`` and
    ``fill_`` (not the mask); ``index_select``, ``gather``, ``cat`` and the other operations want every tensor on the
    device."""
    name = str(func)
    position = next((index for prefix, index in _SCALAR_ARGUMENT.items() if name.startswith(prefix)), None)
    if position is not None:  # before the elementwise rule: masked_fill is tagged elementwise, but its mask is no number
        return [args[position]] if len(args) > position and torch.is_tensor(args[position]) else []
    if torch.Tag.pointwise in getattr(func, "tags", ()):
        return [item for item in tree_flatten(args)[0] if isinstance(item, torch.Tensor)]
    return []


def _run(func, args, kwargs):
    """``func`` on the CPU data of its arguments, after checking that it does not mix devices; its tensor results on the
    device when any argument was, or when it was asked to create them there."""
    name = str(func)
    tensors = [item for item in tree_flatten((args, kwargs))[0] if isinstance(item, torch.Tensor)]
    on_device = any(isinstance(tensor, OnDevice) for tensor in tensors)
    written = _written_arguments(func, args, kwargs)
    scalars = [item for item in _cpu_scalars_allowed(func, args) if not any(item is output for output in written)]
    on_cpu = [tensor for tensor in tensors if not isinstance(tensor, OnDevice) and tensor.device.type == "cpu"
              and (tensor.dim() > 0 or not any(tensor is scalar for scalar in scalars))]
    if name.startswith(_INDEXING) and isinstance(args[0], OnDevice):
        indices = tree_flatten(args[1])[0]
        on_cpu = [tensor for tensor in on_cpu if not any(tensor is index for index in indices)]
    if on_device and on_cpu and not name.startswith(_MOVES):
        raise DeviceMismatch(f"{func} mixes a device tensor with CPU tensor(s) of shape "
                             f"{[tuple(tensor.shape) for tensor in on_cpu]}")
    if (on_device or _names_the_device(kwargs.get("device"))) and any(
            isinstance(item, torch.Generator) and item.device.type == "cpu" for item in tree_flatten((args, kwargs))[0]):
        raise DeviceMismatch(f"{func}: a draw on the device from a CPU generator (CUDA: \"Expected a 'cuda' device type "
                             "for generator but found 'cpu'\")")
    to_cpu = (name.startswith("aten._to_copy") and kwargs.get("device") is not None
              and torch.device(kwargs["device"]).type == "cpu")
    if (to_cpu and on_device and not _settings["float64"] and kwargs.get("dtype") == torch.float64
            and isinstance(args[0], OnDevice) and args[0].dtype != torch.float64):
        raise TypeError(NO_FLOAT64_MESSAGE)  # torch's MPS copy converts on the device first
    make_on_device = (on_device or _names_the_device(kwargs.get("device"))) and not to_cpu

    def on_cpu_instead(item):
        if isinstance(item, OnDevice):
            return item.data_on_cpu
        if isinstance(item, torch.device) and item == DEVICE:
            return torch.device("cpu")
        return item

    result = func(*tree_map(on_cpu_instead, args), **tree_map(on_cpu_instead, kwargs))
    if make_on_device and not _settings["float64"] and any(
            isinstance(item, torch.Tensor) and item.dtype == torch.float64 for item in tree_flatten(result)[0]):
        raise TypeError(NO_FLOAT64_MESSAGE)
    if name.startswith("aten.copy_") and isinstance(args[0], OnDevice):
        return args[0]
    if not make_on_device:
        return result
    return tree_map(lambda item: OnDevice(item) if isinstance(item, torch.Tensor) and not isinstance(item, OnDevice)
                    else item, result)


class _Factories(TorchDispatchMode):
    """Operations on device tensors, and factories told to create on the device, go through :func:`_run`."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if any(issubclass(kind, OnDevice) for kind in types) or _names_the_device(kwargs.get("device")):
            return _run(func, args, kwargs)
        return func(*args, **kwargs)


class _Constructors(TorchFunctionMode):
    """``torch.tensor`` / ``as_tensor`` / ``asarray`` of Python data with ``device=`` the simulated device."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.tensor, torch.as_tensor, torch.asarray) and _names_the_device(kwargs.get("device")):
            if args and isinstance(args[0], OnDevice):
                return args[0] if kwargs.get("dtype") is None else args[0].to(kwargs["dtype"])
            created = func(*args, **{**kwargs, "device": "cpu"})
            if created.dtype == torch.float64 and not _settings["float64"]:
                raise TypeError(NO_FLOAT64_MESSAGE)
            return OnDevice(created)
        return func(*args, **kwargs)


@contextlib.contextmanager
def simulated_device(*, float64: bool = True):
    """Within: tensors on ``meta`` are :class:`OnDevice` tensors holding real data (in float64 only with ``float64``).
    ``module.to`` swaps each parameter's content in place (as ``param.data = ...`` does for a CUDA copy), so that tied
    weights stay one parameter."""
    from transformers import PreTrainedModel

    swapping = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    loading = PreTrainedModel.__dict__["from_pretrained"]
    PreTrainedModel.from_pretrained = classmethod(_outside_the_simulation(loading.__func__))
    _settings["float64"] = float64
    try:
        with _Constructors(), _Factories():
            yield
    finally:
        _settings["float64"] = True
        PreTrainedModel.from_pretrained = loading
        torch.__future__.set_swap_module_params_on_conversion(swapping)


def _outside_the_simulation(function):
    """``function`` run as without the simulation: ``transformers`` builds a model's skeleton on the real ``meta``
    device before it loads the weights (the model is then moved to the simulated device with ``.to``)."""

    @functools.wraps(function)
    def run(*args, **kwargs):
        with _disable_current_modes():
            return function(*args, **kwargs)

    return run


def on_device(tensor: torch.Tensor) -> OnDevice:
    """``tensor``'s data as a device tensor (call within :func:`simulated_device`)."""
    return OnDevice(tensor.detach(), requires_grad=tensor.requires_grad)
