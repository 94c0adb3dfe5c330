"""Text encoders: CLIP-L, OpenCLIP bigG (CLIPTextModelWithProjection layout) and T5 v1.1, plus tokenizers.

    config, params = jaxdit.convert.load_text_encoder("FLUX.1-dev/text_encoder_2", mesh=mesh)  # T5-XXL, sharded
    tokenizer = load_tokenizer("FLUX.1-dev/tokenizer_2")
    embeds = t5_encode(params, config, tokenizer, ["a photo of a cat"], max_length=512)
"""

from jaxdit.text.clip import CLIP_G, CLIP_L, CLIP_L_PROJECTION, CLIPTextOutput, ClipTextConfig  # noqa: F401
from jaxdit.text.encode import CLIPPromptEmbeds, T5PromptEmbeds, clip_encode, t5_encode, tokenize  # noqa: F401
from jaxdit.text.loading import load_tokenizer  # noqa: F401
from jaxdit.text.t5 import T5_XXL, T5EncoderConfig  # noqa: F401
