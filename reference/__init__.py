"""Independent implementations to compare against: diffusers / transformers models and pipelines
built from the same CompVis config trees, with weights converted by diffusers' own converters, and
the tiny configurations every test and benchmark uses. Not part of the installed product."""
