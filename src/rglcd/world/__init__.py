"""The miniature world: captioned shapes, a tiny SD-layout teacher, rewards and a judge, all trained here."""
