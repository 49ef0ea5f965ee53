//! NF4/FP4 (bitsandbytes) codecs.
