"""kubetune.trainer: data -> model -> train -> checkpoint -> adapter in object storage, with metrics."""
