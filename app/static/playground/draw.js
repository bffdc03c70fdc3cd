// The picture: the chosen image and, over it, one layer of masks and one of boxes and labels.
// Each layer's canvas has the size the server measured (boxes and masks are in those pixels); CSS
// stretches the layers over one another.

import { paintMask } from "./rle.js";

// supervision's default palette, so the page matches the server's annotated PNGs and the client's drawings.
export const PALETTE = [
  "#a351fb", "#ff4040", "#ffa1a0", "#ff7633", "#ffb633", "#d1d435", "#4cfb12", "#94cf1a", "#40de8a",
  "#1b9640", "#00d6c1", "#2e9caa", "#00c4ff", "#364797", "#6675ff", "#0019ef", "#863aff", "#530087",
  "#cd3aff", "#ff97ca", "#ff39c9",
];
const MASK_ALPHA = Math.round(0.45 * 255);

function rgb(hex) {
  return [1, 3, 5].map((i) => parseInt(hex.slice(i, i + 2), 16));
}

/** One colour per distinct label, in order of first appearance (as the server's drawing does). */
export function colours(objects) {
  const names = [...new Set(objects.map((o) => o.label || "?"))];
  return objects.map((o) => PALETTE[names.indexOf(o.label || "?") % PALETTE.length]);
}

export class Stage {
  constructor(root) {
    this.root = root;
    this.imageLayer = root.querySelector("#image-layer");
    this.maskLayer = root.querySelector("#mask-layer");
    this.boxLayer = root.querySelector("#box-layer");
  }

  showImage(bitmap) {
    this.imageLayer.width = bitmap.width;
    this.imageLayer.height = bitmap.height;
    this.imageLayer.getContext("2d").drawImage(bitmap, 0, 0);
    this.root.classList.add("has-image");
    this.clearOverlays();
  }

  clear() {
    this.imageLayer.width = 0;
    this.imageLayer.height = 0;
    this.root.classList.remove("has-image");
    this.clearOverlays();
  }

  clearOverlays() {
    for (const layer of [this.maskLayer, this.boxLayer]) {
      layer.getContext("2d").clearRect(0, 0, layer.width, layer.height);
    }
  }

  /** Draw every object's mask (when it has one), box and label; `size` is the result's image size. */
  drawObjects(objects, size) {
    for (const layer of [this.maskLayer, this.boxLayer]) {
      layer.width = size.width;
      layer.height = size.height;
    }
    const palette = colours(objects);
    this.drawMasks(objects, palette, size);
    this.drawBoxes(objects, palette, size);
  }

  drawMasks(objects, palette, size) {
    const withMasks = objects.map((o, i) => [o, palette[i]]).filter(([o]) => o.mask);
    if (withMasks.length === 0) return;
    const context = this.maskLayer.getContext("2d");
    const pixels = context.createImageData(size.width, size.height);
    for (const [object, colour] of withMasks) paintMask(pixels, object.mask, [...rgb(colour), MASK_ALPHA]);
    context.putImageData(pixels, 0, 0);
  }

  drawBoxes(objects, palette, size) {
    const context = this.boxLayer.getContext("2d");
    const thickness = Math.min(size.width, size.height) < 1080 ? 2 : 4; // supervision's choice
    const fontSize = Math.max(12, Math.round(Math.min(size.width, size.height) / 28));
    context.font = `${fontSize}px sans-serif`;
    context.textBaseline = "top";
    objects.forEach((object, i) => {
      const b = object.box;
      const x1 = Math.round(Math.min(b.x_min, b.x_max));
      const y1 = Math.round(Math.min(b.y_min, b.y_max));
      const x2 = Math.round(Math.max(b.x_min, b.x_max));
      const y2 = Math.round(Math.max(b.y_min, b.y_max));
      context.fillStyle = palette[i];
      // The outline lies inside the box: its outer edge is the box's edge.
      context.fillRect(x1, y1, x2 - x1, thickness);
      context.fillRect(x1, y2 - thickness, x2 - x1, thickness);
      context.fillRect(x1, y1, thickness, y2 - y1);
      context.fillRect(x2 - thickness, y1, thickness, y2 - y1);

      const label = object.label || "?";
      const pad = Math.round(fontSize / 4);
      const width = Math.ceil(context.measureText(label).width) + 2 * pad;
      const height = fontSize + 2 * pad;
      const top = y1 - height >= 0 ? y1 - height : y1; // above the box, or inside it at the image's top
      context.fillRect(x1, top, width, height);
      context.fillStyle = "#ffffff";
      context.fillText(label, x1 + pad, top + pad);
    });
  }
}
