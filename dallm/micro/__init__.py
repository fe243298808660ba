"""The micro world: a miniature pretrained text-to-image model, its teacher, and its KID feature net."""
