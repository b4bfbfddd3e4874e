"""Building and inspecting WebDataset shards in the format of `dist_signmaml.data.format`."""
