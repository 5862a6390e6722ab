"""The miniature world: captioned shapes, a tiny SD-layout teacher, rewards and a judge, all trained here.

A plugin (:mod:`rglcd.world.plugin`, entry point ``rglcd.plugins: world``): only the CLI and the experiments, the top
layers, import it; the rest of rglcd reaches it through the plugin registries.
"""
