"""DC-SSDAE: deep-compression encoder + single-step diffusion decoder trained with Equilibrium Matching.

The public API is imported lazily so that `import dcssdae` stays cheap (no Lightning import).
"""

__version__ = "0.1.0"

_LAZY = {
    "build_encoder": "dcssdae.encoders",
    "build_decoder": "dcssdae.decoder",
    "Posterior": "dcssdae.encoders",
    "sample": "dcssdae.sampling",
    "EquilibriumMatching": "dcssdae.objectives",
    "FlowMatching": "dcssdae.objectives",
    "DCSSDAE": "dcssdae.autoencoder",
    "AutoencoderDCSSD": "dcssdae.diffusers_model",  # needs diffusers (the `diffusers` extra)
}

__all__ = ["DCSSDAE", "AutoencoderDCSSD", "EquilibriumMatching", "FlowMatching", "Posterior", "build_decoder", "build_encoder", "sample"]
assert sorted(__all__) == sorted(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'dcssdae' has no attribute {name!r}")
