"""Generated DELIVER-format street scenes: the generator of the embedded default data set.

Real DELIVER cannot be fetched on an offline machine, so `pipeline make-sample`
renders small procedural drives in the exact DELIVER on-disk layout. Each scene is
a road with sidewalks, building facades, trees, poles, vehicles and pedestrians,
rendered by a pinhole camera moving forward one step per frame, so that:

- RGB carries class-dependent colour and texture (what names a class);
- depth (`depth/`, uint16 mm) and HHA (`hha/`) carry geometry (ground vs upright);
- LiDAR carries sparse range scan lines (robust in the dark, short range in fog);
- events carry moving edges from the frame-to-frame motion (robust at night).

Weather degrades RGB (night: dark and noisy; fog: contrast falls with depth; rain:
streaks; cloud: flat light) and the five sensor failures act on the sensor they name.
Everything is drawn from `numpy.random.default_rng([seed, split, scene])`, so a
seed gives the same bytes on every machine.

The dataset reader for it is `any2seg.datasets.sample` (the DELIVER reader, registered as
`sample`); this package only generates. Where things live:
  scene       the street: layout, objects, colours (`make_scene`)
  render      rasterised geometry of one view (`render`, `Frame`)
  appearance  colours, textures and weather (`albedo`, `apply_weather`)
  sensors     camera, events, LiDAR, depth / HHA, labels
  write       `SampleSpec`, `make_sample` (the DELIVER layout, published whole)
"""

from any2seg.synth.appearance import albedo, apply_weather
from any2seg.synth.render import Frame, render
from any2seg.synth.scene import Scene, make_scene
from any2seg.synth.sensors import camera, depth_mm, events, hha, lidar, semantic
from any2seg.synth.write import (
    GENERATOR,
    MANIFEST,
    MAX_FRAMES,
    MAX_SIZE,
    SampleSpec,
    make_sample,
    read_manifest,
)

__all__ = [
    "GENERATOR", "MANIFEST", "MAX_FRAMES", "MAX_SIZE", "Frame", "SampleSpec", "Scene", "albedo",
    "apply_weather", "camera", "depth_mm", "events", "hha", "lidar", "make_sample", "make_scene",
    "read_manifest", "render", "semantic",
]
