"""UVR: training-free restriction of unsafe information flow in MM-DiT joint attention.

`localize` finds unsafe patches in the start-up stage from anchor scores; `regulate` turns the masks
into attention transformations and edits for `jaxdit.hooks`. `UVRController.reference` is the public
reference code's exact setting, the defaults are jaxdit's (docs/uvr.md lists every difference).
"""
