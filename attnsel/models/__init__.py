"""The embedded tiny pipeline: a text encoder, a DiT-style transformer and a VAE decoder, seeded, no downloads.

Every attention goes through `attnsel.nn.Attention`, so each layer picks its backend when it is built.
"""

from .text_encoder import TinyTextEncoder
from .transformer import TinyDiT
from .vae import TinyVAEDecoder

__all__ = ["TinyTextEncoder", "TinyDiT", "TinyVAEDecoder", "NATIVE_COMPONENTS"]

# component name -> factory: what `ComponentLoader.load_native` builds.
NATIVE_COMPONENTS = {
    "text_encoder": TinyTextEncoder,
    "transformer": TinyDiT,
    "vae": TinyVAEDecoder,
}
