"""`lifl sim`: simulate many FL clients against LIFL, in real processes or in virtual time."""
