"""cacheaug: how a sample is augmented, the one definition the builder and the live readers share.

`cacheaug.transforms`: the presets, user factories (`module:factory`), the per-sample seeding of
torch, `random` and numpy (the rule itself is `cacheformat.seeding`), and `augment`. Imports the
contract (`cacheformat`), never the builder or the readers.
"""
