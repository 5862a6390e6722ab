"""The miniature world: captioned shapes, a tiny SD-layout teacher, rewards and a judge, all trained here.

A leaf plugin (:mod:`rglcd.world.plugin`, entry point ``rglcd.plugins: world``): the rest of rglcd never imports it.
"""
