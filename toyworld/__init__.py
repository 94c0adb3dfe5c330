"""The toy world: rendered scenes with exact ground truth, a small trained FLUX-architecture model on them,
a detector for every shape and colour, and concept suites, so safety methods can be measured end to end
offline (docs/toyworld.md).

    from jaxdit.toyworld.pipeline import ToyWorld
    from jaxdit.toyworld.detector import Detector
    tw, det = ToyWorld.load(), Detector.load()          # the committed weights
    images = tw.generate(["a red star at the top left"], seed=0)
    print(det.read(images))
"""
