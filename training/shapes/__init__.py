"""The procedural "shapes" world of the shipped default model, used to train and measure it.

:mod:`.world` (vocabulary and geometry), :mod:`.captions` (caption grammar), :mod:`.scenes`
(scenes, renderer, training examples) and :mod:`.analyze` (pixels → attributes) need only numpy and
Pillow, and their public names are re-exported here; :mod:`.datasets` holds the torch datasets for
training and is imported on its own.
"""
from .analyze import ShapeAnalysis, analyze, nearest_colour
from .captions import Caption, parse_caption
from .scenes import ShapeSpec, sample_spec, spec_for_caption, training_caption, training_example
from .world import (ALL_SHAPES, COLOURS, EXTRA_SHAPES, HELD_OUT, IMAGE_SIZE, PALETTE, POSITIONS, SHAPES,
                    SIZES, is_held_out, training_pairs)

__all__ = ["ALL_SHAPES", "COLOURS", "EXTRA_SHAPES", "HELD_OUT", "IMAGE_SIZE", "PALETTE", "POSITIONS",
           "SHAPES", "SIZES", "Caption", "ShapeAnalysis", "ShapeSpec", "analyze", "is_held_out",
           "nearest_colour", "parse_caption", "sample_spec", "spec_for_caption", "training_caption",
           "training_example", "training_pairs"]
