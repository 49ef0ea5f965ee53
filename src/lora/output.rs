//! Writing the merged model as an HF folder (filled in below).
