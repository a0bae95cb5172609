"""A pytest plugin for running diffusers' own tests with our compiled transformer swapped in.

Pipeline tests: every ``DiTPipeline`` those tests build gets, right after it is built, the transformer
``qc.compile_pipeline`` makes of its own (a ``QCTransformer``), exactly as docs/diffusers.md says.

Model tests (``QC_SWAP_MODELS=1``): in every test class whose ``model_class`` is a transformer we
support (``qc_compiler.models.known_classes()``: DiT, PixArt, SD3, Flux, Sana, Wan), ``model_class``
becomes a ``QCTransformer`` subclass. ``model_class(**init_dict)`` builds the original class from the
init dict (same RNG draws, so the same weights) and stands in for it as the ``QCTransformer`` a
pipeline would get. On its first forward it compiles that model with ``qc.compile`` and NO passes
(a step-independent model serving any timestep), at the geometry of that call (latent and text
size, as ``compile_pipeline`` computes it for a pipeline call), and from then on every forward goes
through the compiled graph (``QCTransformer.forward``, i.e. the adapter's ``pipeline_forward``); the
original is never called again. ``save_pretrained`` before any forward compiles at the geometry of
the running test's ``get_dummy_inputs()``. Everything else is ``QCTransformer``'s own behaviour (it
refuses what cannot apply to a compiled graph; it is not a CacheMixin nor a PeftAdapterMixin).

Nothing of diffusers' test code is copied: this runs their suite, from a snapshot of their
repository, against us.

    QC_SWAP_PASSES="step_cache:interval=1" QC_SWAP_STEPS=2 PYTHONPATH=<qc-compiler>/scripts \\
        python -m pytest -p qc_diffusers_swap tests/pipelines/dit/test_dit.py -k "not Integration"
    QC_SWAP_MODELS=1 PYTHONPATH=<qc-compiler>/scripts \\
        python -m pytest -p qc_diffusers_swap tests/models/transformers/test_models_transformer_flux.py

``QC_SWAP_PASSES``: ``;``-separated passes in the ``qc compile --pass`` spelling (empty: no passes;
pipeline tests only: model tests always compile with none).
``QC_SWAP_STEPS``: the step count the compiled step table follows (the tests' dummy inputs use 2).
``QC_SWAP_MODELS=1``: swap the model class of diffusers' model tests as above.
``QC_SWAP_PIPELINE_INPUTS=1`` (a diagnostic, with ``QC_SWAP_MODELS=1``): the swapped tests' dummy
inputs become what a pipeline passes: one timestep for the whole batch (the first sample's; a
compiled model refuses one per sample), Flux's ``img_ids``/``txt_ids`` on the latent grid (random
ids in the tests; ours are compiled constants), an all-ones ``encoder_attention_mask`` for PixArt
and Sana (their pipelines always pass one). It changes the tests' inputs: report its counts apart.
"""
import functools
import inspect
import math
import os
import weakref

import diffusers
import pytest
import torch

import qc_compiler as qc
from qc_compiler.cli import parse_pass_spec
from qc_compiler.models import Geometry, adapter_for, known_classes
from qc_compiler.models.diffusers_model import transformer_class

SWAPPED = {"pipelines": 0, "models": 0, "compiles": 0, "graph_forwards": 0, "refused_forwards": 0, "max_diff": 0.0}
_CURRENT = {"test": None}  # the running test's instance: its get_dummy_inputs() sizes a save before any forward
_HOOKED = weakref.WeakSet()  # graph modules whose calls are counted
_SWAP_CLASSES = {}


def _passes():
    return [parse_pass_spec(spec) for spec in os.environ.get("QC_SWAP_PASSES", "").split(";") if spec.strip()]


def _swap(init):
    @functools.wraps(init)  # diffusers reads the pipeline's components off __init__'s signature
    def wrapped(self, *args, **kwargs):
        init(self, *args, **kwargs)
        if type(self.transformer).__name__ == "DiTTransformer2DModel":
            qc.compile_pipeline(self, passes=_passes(), num_inference_steps=int(os.environ.get("QC_SWAP_STEPS", "2")))
            SWAPPED["pipelines"] += 1

    return wrapped


# --- model tests ---------------------------------------------------------------------------------
def _geometry(adapter, kwargs):
    """The size a call runs at, as ``compile_pipeline`` gives it to ``qc.compile`` (None: fixed-size DiT)."""
    if not adapter.text_conditioned:
        return None
    x, text = kwargs["hidden_states"], kwargs.get("encoder_hidden_states")
    tokens = int(text.shape[1]) if text is not None and text.ndim == 3 else None
    if adapter.name == "flux":  # packed 2x2 latent patches: (B, h*w, C); the geometry is in latent pixels
        ids, n = kwargs.get("img_ids"), int(x.shape[1])
        if ids is not None and torch.equal(ids, ids.round()) and ids.ndim == 2:
            h, w = int(ids[:, 1].max()) + 1, int(ids[:, 2].max()) + 1  # a pipeline's grid of positions
        else:
            h = w = math.isqrt(n)
        if h * w != n:
            raise qc.QCError(f"cannot tell the grid of {n} packed Flux tokens")
        return Geometry(height=2 * h, width=2 * w, text_tokens=tokens)
    if x.ndim == 5:  # Wan: (B, C, F, H, W)
        return Geometry(height=int(x.shape[3]), width=int(x.shape[4]), frames=int(x.shape[2]), text_tokens=tokens)
    return Geometry(height=int(x.shape[2]), width=int(x.shape[3]), text_tokens=tokens)


def _count_graph_calls(compiled):
    graph = getattr(compiled, "graph_module", None)
    if graph is not None and graph not in _HOOKED:
        graph.register_forward_pre_hook(lambda module, args: SWAPPED.__setitem__("graph_forwards",
                                                                                 SWAPPED["graph_forwards"] + 1))
        _HOOKED.add(graph)


def swap_class(original_class):
    """A ``QCTransformer`` subclass standing in for ``original_class`` (see the module docstring)."""
    if original_class in _SWAP_CLASSES:
        return _SWAP_CLASSES[original_class]
    base = transformer_class()
    loading = {"depth": 0}

    class Swapped(base):
        def __init__(self, **init_dict):
            if loading["depth"]:  # from_pretrained: the saved compiled model is attached next
                super().__init__(**init_dict)
                return
            source = original_class(**init_dict)
            super().__init__(**{k: v for k, v in dict(source.config).items() if not k.startswith("_")})
            self.__dict__["_source"] = source
            SWAPPED["models"] += 1

        @classmethod
        def from_pretrained(cls, *args, **kwargs):
            loading["depth"] += 1
            try:
                return super(Swapped, cls).from_pretrained(*args, **kwargs)
            finally:
                loading["depth"] -= 1

        def _compile(self, kwargs):
            source = self.__dict__["_source"]
            adapter = adapter_for(source)
            geometry = _geometry(adapter, kwargs)
            adapter = adapter.for_model(source, geometry)
            compiled = qc.compile(source, passes=[], adapter=adapter, geometry=geometry)
            self.attach(compiled, adapter.name, source=source)
            SWAPPED["compiles"] += 1

        def forward(self, *args, **kwargs):
            if args:  # the tests call by keyword; a positional latent is hidden_states
                kwargs["hidden_states"], args = args[0], args[1:]
            first = self.compiled is None and self.__dict__.get("_source") is not None
            try:
                if first:
                    self._compile(kwargs)
                if self.compiled is not None:
                    _count_graph_calls(self.compiled)
                out = super().forward(*args, **kwargs)
            except Exception:
                SWAPPED["refused_forwards"] += 1
                raise
            if first and torch.is_tensor(x := (out[0] if isinstance(out, tuple) else out.sample)):
                try:  # how far the compiled graph is from the model it was compiled from (a note, not a check)
                    with torch.no_grad():
                        ref = self.__dict__["_source"](*args, **{**kwargs, "return_dict": False})[0]
                    SWAPPED["max_diff"] = max(SWAPPED["max_diff"], float((x.float() - ref.float()).abs().max()))
                except Exception:  # noqa: BLE001 - the test's outcome is the compiled model's, not this note's
                    pass
            return out

        # before the first forward nothing is compiled: these act on the model that will be
        def to(self, *args, **kwargs):
            if self.compiled is None and self.__dict__.get("_source") is not None:
                self.__dict__["_source"].to(*args, **kwargs)
                return self
            return super().to(*args, **kwargs)

        @property
        def dtype(self):
            if self.compiled is None and self.__dict__.get("_source") is not None:
                return self.__dict__["_source"].dtype
            return super().dtype

        @property
        def device(self):
            if self.compiled is None and self.__dict__.get("_source") is not None:
                return self.__dict__["_source"].device
            return super().device

        def save_pretrained(self, *args, **kwargs):
            if self.compiled is None and self.__dict__.get("_source") is not None and _CURRENT["test"] is not None:
                self._compile(_CURRENT["test"].get_dummy_inputs())
            return super().save_pretrained(*args, **kwargs)

    Swapped.__name__ = Swapped.__qualname__ = f"QCTransformer_{original_class.__name__}"
    Swapped.__module__ = __name__
    _SWAP_CLASSES[original_class] = Swapped
    return Swapped


def _swap_model_class(cls):
    """Make ``cls.model_class`` the swapped class of the one it names, when we support it."""
    if "_qc_swapped" in cls.__dict__:
        return
    prop = inspect.getattr_static(cls, "model_class", None)
    if not isinstance(prop, property):
        return

    def model_class(self):
        original = prop.fget(self)
        return swap_class(original) if isinstance(original, type) and original.__name__ in known_classes() else original

    cls.model_class = property(model_class)
    cls._qc_swapped = True
    if os.environ.get("QC_SWAP_PIPELINE_INPUTS") == "1" and hasattr(cls, "get_dummy_inputs"):
        dummy = cls.get_dummy_inputs

        @functools.wraps(dummy)
        def get_dummy_inputs(self, *args, **kwargs):
            return _as_pipeline_passes(prop.fget(self).__name__, dummy(self, *args, **kwargs))

        cls.get_dummy_inputs = get_dummy_inputs


def _as_pipeline_passes(class_name, inputs):
    """The diagnostic QC_SWAP_PIPELINE_INPUTS: the tests' dummy inputs as a pipeline would pass them."""
    t = inputs.get("timestep")
    if torch.is_tensor(t) and t.numel() > 1:  # one timestep per call: the first sample's
        inputs["timestep"] = torch.full_like(t, t.reshape(-1)[0].item())
    x, text = inputs.get("hidden_states"), inputs.get("encoder_hidden_states")
    if class_name == "FluxTransformer2DModel" and torch.is_tensor(inputs.get("img_ids")):
        from qc_compiler.models.adapters.flux import flux_image_ids

        side = math.isqrt(int(x.shape[1]))  # the pipeline's grid of positions; text positions are zeros
        if side * side == int(x.shape[1]):
            ids = inputs["img_ids"]
            inputs["img_ids"] = flux_image_ids(side, side, ids.dtype).to(ids.device).reshape(ids.shape[:-2] + (-1, 3))
            inputs["txt_ids"] = torch.zeros_like(inputs["txt_ids"])
    if class_name in ("PixArtTransformer2DModel", "SanaTransformer2DModel") and torch.is_tensor(text) \
            and inputs.get("encoder_attention_mask") is None:  # their pipelines always pass the prompt mask
        inputs["encoder_attention_mask"] = torch.ones(text.shape[:2], dtype=torch.int64, device=text.device)
    return inputs


def pytest_configure(config):
    diffusers.DiTPipeline.__init__ = _swap(diffusers.DiTPipeline.__init__)


def pytest_collection_modifyitems(session, config, items):
    if os.environ.get("QC_SWAP_MODELS") == "1":
        for item in items:
            if getattr(item, "cls", None) is not None:
                _swap_model_class(item.cls)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    _CURRENT["test"] = getattr(item, "instance", None)


def pytest_terminal_summary(terminalreporter):
    terminalreporter.write_line(f"qc_diffusers_swap: {SWAPPED['pipelines']} DiTPipelines got a compiled transformer "
                                f"(passes: {os.environ.get('QC_SWAP_PASSES') or 'none'})")
    if os.environ.get("QC_SWAP_MODELS") == "1":
        terminalreporter.write_line(
            f"qc_diffusers_swap: {SWAPPED['models']} models built as QCTransformer, {SWAPPED['compiles']} compiled "
            f"(no passes); {SWAPPED['graph_forwards']} forwards ran the compiled graph, {SWAPPED['refused_forwards']} "
            f"forwards raised (compiling or running); max |compiled - original| on first forwards: {SWAPPED['max_diff']:.3g}")
