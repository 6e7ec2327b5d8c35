"""The runtime data path: the on-disk format (spec), shard lists, decoding, collation into a `Batch`, the
streaming reader and the item catalog. The offline tools that write and check datasets are in
`trainer/dataset_tools/`."""
