"""`template`: a deterministic description from the label map and the weather.

"a foggy street with road, buildings, cars and sky": the classes covering the most
pixels, largest first. It needs no model, so the embedded default runs anywhere; with
real data it is a baseline for the LLaMA-Adapter captions the paper uses.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from any2seg.datasets import Sample
from stages.teacher.captioners import Captioner, register

# how DELIVER's class names read in a sentence
NATURAL = {
    "Building": "buildings", "Fence": "fences", "Other": "other objects",
    "Pedestrian": "pedestrians", "Pole": "poles", "RoadLine": "road lines", "Road": "road",
    "SideWalk": "sidewalk", "Vegetation": "vegetation", "Cars": "cars", "Wall": "walls",
    "TrafficSign": "traffic signs", "Sky": "sky", "Ground": "ground", "Bridge": "a bridge",
    "RailTrack": "rail tracks", "GroundRail": "guard rails", "TrafficLight": "traffic lights",
    "Static": "static objects", "Dynamic": "dynamic objects", "Water": "water",
    "Terrain": "terrain", "TwoWheeler": "two-wheelers", "Bus": "buses", "Truck": "trucks",
}
OPENINGS = {
    "cloud": "a cloudy street", "fog": "a foggy street", "night": "a street at night",
    "rain": "a rainy street", "sun": "a sunny street",
}


def natural_name(name: str) -> str:
    return NATURAL.get(name, name.replace("_", " ").lower())


def join(words: Sequence[str]) -> str:
    if len(words) <= 1:
        return "".join(words)
    return ", ".join(words[:-1]) + " and " + words[-1]


def compose(opening: str, names: Sequence[str]) -> str:
    """'a foggy street' + ['road', 'cars'] -> 'a foggy street with road and cars'."""
    return f"{opening} with {join(names)}" if names else opening


@register
class TemplateCaptioner(Captioner):
    name = "template"

    def __init__(self, class_names: Sequence[str], max_classes: int = 5,
                 min_fraction: float = 0.01) -> None:
        super().__init__(class_names, max_classes=max_classes, min_fraction=min_fraction)
        self.max_classes = max_classes
        self.min_fraction = min_fraction

    def parts(self, label: np.ndarray, condition: str | None) -> tuple[str, list[str]]:
        """The opening ("a foggy street") and the class names, largest first."""
        valid = label[label != 255]
        opening = OPENINGS.get(condition or "", "a scene")
        if valid.size == 0:
            return opening, []
        counts = np.bincount(valid.ravel(), minlength=len(self.class_names))
        order = [c for c in np.argsort(-counts, kind="stable")
                 if counts[c] >= self.min_fraction * valid.size][: self.max_classes]
        return opening, [natural_name(self.class_names[c]) for c in order]

    def describe(self, label: np.ndarray, condition: str | None) -> str:
        return compose(*self.parts(label, condition))

    def caption(self, samples: Sequence[Sample]) -> list[str]:
        return [self.describe(s.label, s.condition) for s in samples]
