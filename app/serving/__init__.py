"""The serving layer: a route's job -> image preparation -> the engine -> results in the image's pixels."""
