// COCO run-length masks, as the server sends them: {"size": [height, width], "counts": "..."}.

/**
 * Run lengths from a COCO compressed counts string (pycocotools' rleFrString): each number is written
 * in 5-bit groups offset by 48, 0x20 meaning "more groups follow" and 0x10 in the last group the sign;
 * from the third number on, it is stored as the difference to the number two before it.
 */
export function decodeCounts(counts) {
  const runs = [];
  let p = 0;
  while (p < counts.length) {
    let x = 0;
    let k = 0;
    let more = true;
    while (more) {
      if (p >= counts.length) throw new Error("RLE counts end in the middle of a number");
      if (k >= 6) throw new Error("RLE run too long"); // 6 groups hold 30 bits; JS shifts are 32-bit
      const c = counts.charCodeAt(p) - 48;
      x |= (c & 0x1f) << (5 * k);
      more = (c & 0x20) !== 0;
      p += 1;
      k += 1;
      if (!more && (c & 0x10) !== 0) x |= -1 << (5 * k);
    }
    if (runs.length > 2) x += runs[runs.length - 2];
    runs.push(x);
  }
  return runs;
}

/**
 * Paint `rgba` into `imageData` (the mask's size) wherever the mask is set. Runs alternate unset, set,
 * unset... and go down the columns (COCO is column-major), while ImageData is row-major.
 */
export function paintMask(imageData, rle, rgba) {
  const [height, width] = rle.size;
  if (imageData.width !== width || imageData.height !== height) {
    throw new Error(`mask is ${width}x${height}, the layer ${imageData.width}x${imageData.height}`);
  }
  const data = imageData.data;
  const runs = decodeCounts(rle.counts);
  let start = 0;
  for (let r = 0; r < runs.length; r += 1) {
    const end = start + runs[r];
    if (r % 2 === 1) {
      for (let i = start; i < end; i += 1) {
        const offset = ((i % height) * width + Math.floor(i / height)) * 4;
        data[offset] = rgba[0];
        data[offset + 1] = rgba[1];
        data[offset + 2] = rgba[2];
        data[offset + 3] = rgba[3];
      }
    }
    start = end;
  }
  if (start !== width * height) throw new Error(`RLE covers ${start} pixels; ${width}x${height} needs ${width * height}`);
}
