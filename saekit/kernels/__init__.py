"""Fast numerical pieces the kinds choose: UFLDL's closed-form cost and gradient (`classic`, with
its matrix products in `blas`), and the k-sparse encode and decode of the TopK family (`sparse`)."""
