"""Safety methods (UVR, SafeDIG) as pure transformations plugged into models through `jaxdit.hooks`."""
